"""The log stays the truth at any age, with the real stack: a retention of seconds, snapshots
moved by the real scheduler, `rebuild --check` run while calls age out and under load."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.factories import ended, event, published
from tests.integration.stack import Stack, wait_until
from tests.integration.test_reliability import post_interleaved, traffic

MakeStack = Callable[..., Stack]


def revisions(stack: Stack, call_id: str) -> list[int]:
    rows = published(stack.redis.client(), stack.keys)
    found = [json.loads(fields[b"record"]) for _, fields in rows]
    return [record["revision"] for record in found if record["call_id"] == call_id]


def assert_check_clean(stack: Stack) -> None:
    checked = stack.cli("rebuild", "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_call_ages_out_without_a_check_ever_differing(make_stack: MakeStack) -> None:
    stack = make_stack(
        CALLSTATE_RETENTION_SECONDS="6",
        CALLSTATE_MAINTENANCE_INTERVAL_SECONDS="1",
        CALLSTATE_SNAPSHOT_INTERVAL_SECONDS="1",
    )
    stack.start_web()
    stack.start_workers(1)
    stack.start_scheduler()
    shard = stack.keys.shard_of("aging-1")
    started = time.monotonic()
    for payload in (event("aging-1", "ringing", 100), ended("aging-1", 200, "USER_END_CALL", 5)):
        assert stack.post(payload).status_code == 200
    # The reproduction: a recording notice 4 s after the end, so that the log's
    # retention falls between the call's events.
    wait_until(lambda: time.monotonic() - started >= 4, 10, "4 s to pass")
    notice = {"type": "recording", "call_id": "aging-1", "recording_url": "https://r/1"}
    assert stack.post(notice).status_code == 200
    wait_until(lambda: revisions(stack, "aging-1") == [1, 2], 10, "the notice's revision")
    redis = stack.redis.client()
    seen_in_snapshot = False
    while stack.get("/calls/aging-1").status_code == 200:
        assert_check_clean(stack)
        seen_in_snapshot |= bool(redis.hexists(stack.keys.snapshot(shard), "aging-1"))
        assert time.monotonic() - started < 40, "the call was never retired"
    assert seen_in_snapshot, "the call straddled a snapshot and was checked then"
    assert stack.get("/calls/aging-1/record").status_code == 404
    assert_check_clean(stack)
    late = stack.post(ended("aging-1", 200, "USER_END_CALL", 5))
    assert late.status_code == 200
    wait_until(
        lambda: int(redis.hget(stack.keys.verdicts(shard), "rejected:expired") or 0) == 1,
        10,
        "the late event to be refused as expired",
    )
    assert revisions(stack, "aging-1") == [1, 2], "no second revision 1"
    rebuilt = stack.cli("rebuild")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert stack.get("/calls/aging-1").status_code == 404, "a rebuild does not bring it back"


def test_check_finds_nothing_on_a_live_system_under_load(make_stack: MakeStack) -> None:
    stack = make_stack()
    stack.start_web()
    stack.start_workers(2)
    calls: dict[str, list[dict[str, Any]]] = traffic(400, "live")
    sending = threading.Thread(target=post_interleaved, args=(stack, calls, 4))
    sending.start()
    checks = 0
    try:
        while sending.is_alive() or checks < 2:
            assert_check_clean(stack)
            checks += 1
    finally:
        sending.join()
    assert checks >= 2
