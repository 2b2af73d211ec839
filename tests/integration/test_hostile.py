"""Nothing a sender does stops the line: real gunicorn, Redis and RQ worker processes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, cast

from callstate.eventlog import event_fields
from callstate.keys import Keys
from tests.factories import body, ended, event
from tests.integration.stack import Stack, wait_until

MakeStack = Callable[..., Stack]
SHARDS = 8  # the Stack's CALLSTATE_SHARDS
KEYS = Keys("cs", SHARDS)


def same_shard_ids(count: int) -> list[str]:
    """Call ids of one shard: whatever stalls one of them would stall the others."""
    first = KEYS.shard_of("control-0")
    found = (f"hostile-{n}" for n in range(10_000))
    return ["control-0", *[c for c in found if KEYS.shard_of(c) == first][: count - 1]]


def with_field(payload: dict[str, Any], raw_value: bytes) -> bytes:
    return body(payload)[:-1] + b', "extra": ' + raw_value + b"}"


def test_hostile_bodies_are_refused_and_poison_entries_do_not_stall_a_shard(
    make_stack: MakeStack,
) -> None:
    stack = make_stack()
    stack.start_web()
    stack.start_workers(2)
    control, hostile, logged_bad = same_shard_ids(3)
    far_future = int(time.time() * 1000) + 24 * 3600 * 1000
    refused = [
        with_field(event(hostile, "ringing", 1), rb'"x\ud800y"'),
        with_field(event(hostile, "ringing", 1), b"[" * 980 + b"]" * 980),
        with_field(event(hostile, "ringing", 1), b"[" * 30_000 + b"]" * 30_000),
        body(event(hostile, "ringing", 10**40)),
        body(event(hostile, "ringing", far_future)),
        body(ended(hostile, 5, "USER_END_CALL", 10**12)),
    ]
    for raw in refused:
        response = stack.post_raw(raw)
        assert 400 <= response.status_code < 500, (response.status_code, raw[:80])
        assert response.json()["error"]

    # Entries an older version could have logged: they reach the workers as they are.
    redis = stack.redis.client()
    log = KEYS.log(KEYS.shard_of(logged_bad))
    surrogate = body(event(logged_bad, "ringing", 1))[:-1] + rb', "x": "\udc00"}'
    deep = with_field(event(logged_bad, "ringing", 2), b"[" * 980 + b"]" * 980)
    poison_ids = [
        cast(bytes, redis.xadd(log, event_fields(logged_bad, raw))).decode()
        for raw in (surrogate, deep)
    ]

    for status, ts in (("ringing", 100), ("answered", 110)):
        assert stack.post(event(control, status, ts)).status_code == 200
    assert stack.post(ended(control, 200, "USER_END_CALL", 30)).status_code == 200
    record = wait_until(
        lambda: stack.get(f"/calls/{control}/record").ok, 20, "the control call's record"
    )
    assert record
    assert stack.get(f"/calls/{control}/record").json()["disposition"] == "answered"
    assert stack.get(f"/calls/{hostile}").status_code == 404

    journal = stack.get(f"/calls/{logged_bad}/events").json()["events"]
    assert [(e["log_id"], e["verdict"], e["reason"]) for e in journal] == [
        (log_id, "rejected", "unprocessable") for log_id in poison_ids
    ]
    assert [e["error"] for e in journal] == ["invalid_field", "too_deep"]

    check = stack.cli("rebuild", "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    shown = json.loads(stack.cli("quarantine", "--limit", "50", "--json").stdout)
    assert {item["log_id"] for item in shown if item["error"] == "unprocessable"} == set(poison_ids)
    assert sum(1 for item in shown if item["status"] in (400, 422)) == len(refused)
    assert "84909985668" not in stack.logs()
