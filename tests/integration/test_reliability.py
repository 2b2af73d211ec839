"""Order across workers, killed workers, a killed Redis, rebuild, sweeper and garbage."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from rq.worker import BaseWorker, Worker

from callstate.codec import unpack_doc
from callstate.connection import REDIS_TIMEOUT_SECONDS, get_many
from callstate.eventlog import event_fields
from callstate.keys import Keys
from tests.factories import SCENARIOS, body, ended, event, published, scenario
from tests.integration.stack import RedisServer, Stack, wait_until

MakeStack = Callable[..., Stack]


def traffic(calls: int, prefix: str) -> dict[str, list[dict[str, Any]]]:
    return {
        f"{prefix}-{n}": scenario(f"{prefix}-{n}", SCENARIOS[n % len(SCENARIOS)], 10_000 * n)
        for n in range(calls)
    }


def post_interleaved(
    stack: Stack, calls: dict[str, list[dict[str, Any]]], threads: int
) -> dict[str, list[str]]:
    """Send each call's events in order, many calls at once; return the log ids acknowledged."""
    ids = sorted(calls)
    groups = [ids[n::threads] for n in range(threads)]

    def send(group: list[str]) -> dict[str, list[str]]:
        acked: dict[str, list[str]] = {call_id: [] for call_id in group}
        for step in range(max(len(calls[c]) for c in group)):
            for call_id in group:
                if step < len(calls[call_id]):
                    response = stack.post(calls[call_id][step])
                    assert response.status_code == 200, response.text
                    acked[call_id].append(response.json()["log_id"])
        return acked

    acked: dict[str, list[str]] = {}
    with ThreadPoolExecutor(threads) as pool:
        for part in pool.map(send, groups):
            acked.update(part)
    return acked


def docs(stack: Stack, call_ids: list[str]) -> dict[str, Any]:
    found = get_many(stack.redis.client(), [stack.keys.call(call_id) for call_id in call_ids])
    return {c: unpack_doc(raw) if raw else None for c, raw in zip(call_ids, found, strict=True)}


def all_ended(stack: Stack, call_ids: list[str]) -> bool:
    return all(d is not None and d["status"] == "ended" for d in docs(stack, call_ids).values())


def assert_applied_exactly_once_in_order(
    stack: Stack, calls: dict[str, list[dict[str, Any]]], acked: dict[str, list[str]]
) -> None:
    for call_id, doc in docs(stack, sorted(calls)).items():
        journal = doc["journal"]
        assert [item["log_id"] for item in journal] == acked[call_id], call_id
        assert {item["verdict"] for item in journal} == {"accepted"}, call_id
        sent = [(e["call_status"], e["timestamp_ms"]) for e in calls[call_id]]
        assert [(item["call_status"], item["timestamp_ms"]) for item in journal] == sent
        assert doc["counts"]["accepted"] == len(sent)
    records = published(stack.redis.client(), stack.keys)
    per_call = sorted(fields[b"call_id"].decode() for _, fields in records)
    assert per_call == sorted(calls), "one record per call, none twice"


def test_events_of_a_call_apply_in_order_across_several_workers(make_stack: MakeStack) -> None:
    stack = make_stack()
    stack.start_web()
    stack.start_workers(4)
    # Every worker registered first: this test is about order across workers, not about how a
    # job hands shards to workers that start after it (tests/unit/test_drain.py).
    wait_until(lambda: len(_rq_workers(stack)) == 4, 30, "every worker to register")
    calls = traffic(120, "order")
    acked = post_interleaved(stack, calls, threads=8)
    wait_until(lambda: all_ended(stack, sorted(calls)), 60, "every call to end")
    assert_applied_exactly_once_in_order(stack, calls, acked)
    busy_workers = [worker for worker in _rq_workers(stack) if worker.successful_job_count > 0]
    assert len(busy_workers) > 1, "the drains really ran in several worker processes"


def _rq_workers(stack: Stack) -> list[BaseWorker]:
    return list(Worker.all(connection=stack.redis.client()))


def test_worker_killed_mid_drain_loses_nothing_and_applies_nothing_twice(
    make_stack: MakeStack,
) -> None:
    stack = make_stack(
        CALLSTATE_DRAIN_BATCH="3",
        CALLSTATE_DRAIN_LOCK_SECONDS="2",
        CALLSTATE_MAINTENANCE_INTERVAL_SECONDS="1",
    )
    stack.start_web()
    calls = traffic(150, "kill")
    acked = post_interleaved(stack, calls, threads=6)
    redis = stack.redis.client()

    def mid_drain() -> bool:
        locked = any(redis.exists(stack.keys.drain_lock(shard)) for shard in range(8))
        applied = sum(1 for d in docs(stack, sorted(calls)).values() if d is not None)
        return locked and 0 < applied < len(calls)

    for round_ in range(2):
        [worker] = stack.start_workers(1, prefix=f"doomed-{round_}")
        wait_until(mid_drain, 30, "a worker in the middle of a drain")
        stack.kill(worker)
    assert not all_ended(stack, sorted(calls))
    stack.start_workers(2, prefix="survivor")
    stack.start_scheduler()
    wait_until(lambda: all_ended(stack, sorted(calls)), 90, "survivors to finish the backlog")
    assert_applied_exactly_once_in_order(stack, calls, acked)


def test_acknowledged_events_survive_a_killed_redis(
    make_stack: MakeStack, redis_server: RedisServer
) -> None:
    stack = make_stack()
    stack.start_web()
    calls = traffic(30, "redis")
    first = {c: events[:2] for c, events in calls.items()}
    acked = post_interleaved(stack, first, threads=4)
    redis_server.kill()
    refused = stack.post(calls["redis-0"][2])
    assert refused.status_code == 503
    assert refused.json()["error"] == "unavailable"
    redis_server.start()
    rest = {c: events[2:] for c, events in calls.items()}
    for call_id, ids in post_interleaved(stack, rest, threads=4).items():
        acked[call_id] += ids
    stack.start_workers(2)
    wait_until(lambda: all_ended(stack, sorted(calls)), 60, "every call to end")
    assert_applied_exactly_once_in_order(stack, calls, acked)


def test_rebuild_reproduces_what_the_workers_produced(make_stack: MakeStack) -> None:
    stack = make_stack()
    stack.start_web()
    stack.start_workers(3)
    calls = traffic(40, "rebuild")
    post_interleaved(stack, calls, threads=4)
    messy = [
        event("rebuild-0", "ringing", 5),
        event("rebuild-1", "ended", 10_001),
        ended("rebuild-2", 20_004, "486 Busy Here", 0),
        {"type": "recording", "call_id": "rebuild-3", "recording_url": "https://r/3"},
    ]
    logged = {}
    for payload in messy:
        answer = stack.post(payload)
        assert answer.status_code == 200
        logged[payload["call_id"]] = answer.json()["log_id"]

    def messy_applied() -> bool:
        found = docs(stack, sorted(logged))
        return all(
            (doc := found[call_id]) is not None
            and log_id in [item["log_id"] for item in doc["journal"]]
            for call_id, log_id in logged.items()
        )

    # Each on its own shard: every one must be applied before the snapshot, not only the last.
    wait_until(messy_applied, 30, "the late events")
    wait_until(lambda: all_ended(stack, sorted(calls)), 60, "every call to end")
    before = docs(stack, sorted(calls))
    check = stack.cli("rebuild", "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "40 calls compared, 0 differ" in check.stdout
    redis = stack.redis.client()
    redis.delete(stack.keys.call("rebuild-5"), stack.keys.call("rebuild-6"))
    assert stack.cli("rebuild", "--check").returncode == 1
    rebuilt = stack.cli("rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert docs(stack, sorted(calls)) == before


def test_silent_call_is_closed_by_the_sweeper_and_revised_by_a_late_end(
    make_stack: MakeStack,
) -> None:
    stack = make_stack(
        CALLSTATE_STALE_AFTER_SECONDS="1", CALLSTATE_MAINTENANCE_INTERVAL_SECONDS="1"
    )
    stack.start_web()
    stack.start_workers(1)
    stack.start_scheduler()
    assert stack.post(event("silent-1", "answered", 1000)).status_code == 200

    def record(revision: int) -> dict[str, Any] | None:
        response = stack.get("/calls/silent-1/record")
        found = response.json() if response.ok else None
        return found if found and found["revision"] == revision else None

    swept = wait_until(lambda: record(1), 30, "the sweeper to close the call")
    assert swept["closed_by"] == "sweeper"
    assert swept["disposition"] == "answered"
    assert stack.get("/calls?active=true").json()["total"] == 0
    assert stack.post(ended("silent-1", 5000, "USER_END_CALL", 4)).status_code == 200
    revised = wait_until(lambda: record(2), 30, "the late end to revise the record")
    assert revised["closed_by"] == "ended_event"
    assert revised["timeline"]["ended"] == 5000
    stream = published(stack.redis.client(), stack.keys)
    assert [json.loads(f[b"record"])["revision"] for _, f in stream] == [1, 2]


def test_garbage_is_refused_quarantined_and_changes_no_call(make_stack: MakeStack) -> None:
    stack = make_stack(CALLSTATE_MAX_BODY_BYTES="4096")
    stack.start_web()
    stack.start_workers(1)
    assert stack.post(event("kept", "ringing", 1)).status_code == 200
    wait_until(lambda: stack.get("/calls/kept").ok, 20, "the good event")
    before = stack.get("/calls/kept").json()
    garbage: list[tuple[bytes, str, int]] = [
        (b"\x00\xff garbage", "application/json", 400),
        (b'{"call_id": "kept", "call_status": ["ringing"]}', "application/json", 422),
        (b'{"call_id": "kept", "call_status": "ringing", "duration": -1}', "application/json", 422),
        (json.dumps(event("kept", "ended", 3)).encode(), "text/plain", 415),
        (b'{"call_id": "' + b"k" * 5000 + b'"}', "application/json", 413),
    ]
    for raw, content_type, status in garbage:
        response = stack.post_raw(raw, content_type)
        assert response.status_code == status
        assert response.json()["error"]
    shown = stack.cli("quarantine", "--limit", "10", "--json")
    assert shown.returncode == 0
    reasons = [item["error"] for item in json.loads(shown.stdout)]
    assert reasons == [
        "request_entity_too_large",
        "unsupported_media_type",
        "out_of_range",
        "invalid_field",
        "invalid_json",
    ]
    assert stack.get("/calls/kept").json() == before


def test_rebuild_refuses_while_a_shard_is_locked(make_stack: MakeStack) -> None:
    stack = make_stack()
    stack.redis.client().set(stack.keys.drain_lock(3), "busy-worker")
    result = stack.cli("rebuild")
    assert result.returncode != 0
    assert "shard 3 is being drained" in result.stderr


def maintained(stack: Stack) -> bool:
    """Whether a worker has run a job: with no events posted, only maintenance."""
    workers = Worker.all(connection=stack.redis.client())
    return any(worker.successful_job_count for worker in workers)


def test_the_scheduler_outlives_a_hung_redis(make_stack: MakeStack) -> None:
    """Under `make run` one process that exits stops them all: a Redis that hangs longer than
    the client's timeout must not end the scheduler, and maintenance must go on afterwards."""
    stack = make_stack(CALLSTATE_MAINTENANCE_INTERVAL_SECONDS="1")
    stack.start_workers(1)
    stack.start_scheduler()
    server = cast(RedisServer, stack.redis)
    assert server.process is not None
    wait_until(lambda: maintained(stack), 20, "the first maintenance")
    os.kill(server.process.pid, signal.SIGSTOP)
    time.sleep(REDIS_TIMEOUT_SECONDS + 2)  # the hang itself is what this test is about
    os.kill(server.process.pid, signal.SIGCONT)
    wait_until(lambda: "scheduler lost Redis" in stack.logs(), 20, "the scheduler to notice")
    assert stack.processes["scheduler"].poll() is None
    # An event logged without waking anyone: only maintenance can get it applied now.
    redis = stack.redis.client()
    keys = Keys("cs", 8)
    fields = event_fields("after-hang", body(event("after-hang", "ringing", 1)))
    redis.xadd(keys.log(keys.shard_of("after-hang")), fields)
    wait_until(lambda: docs(stack, ["after-hang"])["after-hang"], 30, "maintenance to wake it")
