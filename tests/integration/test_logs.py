"""What the processes log, read from their real output: with LOG_FORMAT=json, only JSON objects,
the ids as fields, no phone number, and no per-job line from RQ."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests.factories import body, ended, event
from tests.integration.stack import Stack, wait_until

MakeStack = Callable[..., Stack]
NUMBERS = ("84899199866", "84909985668")


def test_json_logs_name_the_ids_and_never_a_phone_number(make_stack: MakeStack) -> None:
    stack = make_stack(
        LOG_FORMAT="json",
        CALLSTATE_MAINTENANCE_INTERVAL_SECONDS="1",
        CALLSTATE_STALE_AFTER_SECONDS="1",
    )
    stack.start_web(2)
    stack.start_workers(1)
    stack.start_scheduler()
    for status, ts in (("ringing", 1), ("answered", 2)):
        assert stack.post(event("logged-1", status, ts)).ok
    assert stack.post(ended("logged-1", 3, "USER_END_CALL", 8)).ok
    assert stack.post(event("silent-1", "ringing", 1)).ok  # closed by the sweeper: maintenance
    assert stack.post_raw(body(event("bad-1", "ringing", 1, duration=-1))).status_code == 422
    assert stack.get(f"/calls?active=true&number={NUMBERS[0]}").ok
    redis = stack.redis.client()
    shard = stack.keys.shard_of("poison-1")
    raw_id = redis.xadd(stack.keys.log(shard), {"call_id": "poison-1", "event": b"\x01junk"})
    poison_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id

    wait_until(lambda: stack.get("/calls/logged-1/record").ok, 30, "the call's record")
    wait_until(lambda: stack.get("/calls/silent-1/record").ok, 30, "the sweeper's record")
    assert stack.get("/calls/silent-1/record").json()["closed_by"] == "sweeper"
    wait_until(lambda: set_aside(stack, poison_id), 30, "the poison entry to be set aside")
    stack.stop()

    lines = {
        name: [
            json.loads(line) for line in (stack.workdir / f"{name}.log").read_text().splitlines()
        ]
        for name in ("web", "worker-0", "scheduler")
    }
    everything = [line for found in lines.values() for line in found]
    assert all(isinstance(line, dict) for line in everything)
    assert not [line for line in everything if any(n in json.dumps(line) for n in NUMBERS)]
    assert {line["level"] for line in everything} <= {"INFO", "WARNING", "ERROR"}

    [error] = [line for line in lines["worker-0"] if line["level"] == "ERROR"]
    assert (error["call_id"], error["shard"], error["log_id"]) == (
        "poison-1",
        shard,
        poison_id,
    )
    assert any(line["message"].startswith("maintenance: ") for line in lines["worker-0"])
    messages = [line["message"] for line in everything]
    assert not [m for m in messages if "Job OK" in m or "Enqueued job" in m or "discarded" in m]
    access = [line["message"] for line in lines["web"] if line["logger"] == "gunicorn.access"]
    assert '"GET /calls" 200' in " ".join(access), access
    assert access_paths(lines["web"]) >= {"/webhooks/stringee", "/calls", "/calls/logged-1/record"}


def set_aside(stack: Stack, log_id: str) -> bool:
    """Whether the drainer has quarantined the log entry (after logging it)."""
    kept = stack.redis.client().lrange(stack.keys.quarantine(), 0, -1)
    return any(json.loads(item).get("log_id") == log_id for item in kept)


def access_paths(lines: list[dict[str, Any]]) -> set[str]:
    """The paths of the access log's lines (`host "METHOD PATH" status time`)."""
    return {
        line["message"].split('"')[1].split()[1]
        for line in lines
        if line["logger"] == "gunicorn.access"
    }
