"""RQ's queues on a Redis server of their own (CALLSTATE_QUEUE_URL): gunicorn, the event and
records workers and the scheduler against two real servers; the queue's server killed under load,
and drain jobs queued twice."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.sentinel import MasterNotFoundError
from rq import Queue
from rq.registry import StartedJobRegistry

from callstate.connection import text
from callstate.coordination import new_wake_id
from callstate.jobs import enqueue_drain
from tests.factories import ended, event
from tests.integration.ha import DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS, SentinelSet
from tests.integration.stack import RedisServer, Stack, wait_until
from tests.integration.test_reliability import (
    all_ended,
    assert_applied_exactly_once_in_order,
    post_interleaved,
    traffic,
)
from tests.receiver import FAIL, OK, Receiver

pytestmark = pytest.mark.ha
QUEUES = "callstate-queues"
MakeStack = Callable[..., Stack]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_the_pipeline_and_forwarding_run_with_the_queues_on_their_own_server(
    make_stack: MakeStack, queue_server: RedisServer
) -> None:
    """Every record revision reaches a receiver that fails at first, in order; RQ's jobs and
    the delivery jobs' state are on the queue's server, the calls on the data server."""
    with Receiver(SECRET, lambda n: FAIL if n < 3 else OK) as receiver:
        stack = make_stack(
            CALLSTATE_QUEUE_URL=queue_server.url,
            CALLSTATE_RECORD_WEBHOOK_URL=receiver.url,
            CALLSTATE_RECORD_WEBHOOK_SECRET=SECRET,
            CALLSTATE_RECORD_RETRY_FIRST_SECONDS="1",
            CALLSTATE_RECORD_RETRY_TOTAL_SECONDS="3",
        )
        stack.start_web()
        stack.start_workers(2)
        stack.spawn("records", [sys.executable, "-m", "workers.records"])
        stack.spawn("retries", [sys.executable, "-m", "workers.records", "--retries"])
        calls = [f"own-{n}" for n in range(8)]
        for n, call_id in enumerate(calls):
            assert stack.post(event(call_id, "ringing", 1000 + n)).status_code == 200
            assert stack.post(ended(call_id, 9000 + n, "486 Busy Here", 0)).status_code == 200
        notice = {"type": "recording", "call_id": calls[0], "recording_url": "https://r/1"}
        wait_until(lambda: stack.get(f"/calls/{calls[0]}/record").status_code == 200, 20, "end")
        assert stack.post(notice).status_code == 200
        expected = {f"{c}:1" for c in calls} | {f"{calls[0]}:2"}
        wait_until(lambda: set(receiver.accepted.ids) >= expected, 30, "every revision")
        assert set(receiver.accepted.ids) == expected
        ours = [i for i in receiver.accepted.ids if i.startswith(f"{calls[0]}:")]
        assert ours == [f"{calls[0]}:1", f"{calls[0]}:2"]
        assert receiver.accepted.arrivals > len(expected)  # the failures were retried

        ready = stack.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["queue"] == {"ok": True}
        assert ready.json()["checks"]["workers"]["live"] == 2
        data, queue = stack.redis.client(), queue_server.client()
        assert data.keys("rq:*") == []
        assert queue.keys("rq:*") != []
        keys = stack.keys
        assert queue.exists(*(keys.log(s) for s in range(8)), *(keys.call(c) for c in calls)) == 0
        assert sum(queue.hget(keys.forward_counters(s), "delivered") is not None for s in range(8))
        assert not any(data.exists(keys.forward_counters(s)) for s in range(8))
        stats = stack.cli("stats", "--json")
        assert stats.returncode == 0, stats.stderr
        assert f'"delivered": {len(expected)}' in stats.stdout


def running_on_own_queue(
    make_stack: MakeStack, queue_server: RedisServer
) -> tuple[Stack, list[subprocess.Popen[bytes]]]:
    """gunicorn, 2 event workers and the scheduler (maintenance every second), RQ on
    `queue_server`; the stack and its workers."""
    stack = make_stack(
        CALLSTATE_QUEUE_URL=queue_server.url, CALLSTATE_MAINTENANCE_INTERVAL_SECONDS="1"
    )
    stack.start_web()
    workers = stack.start_workers(2)
    stack.start_scheduler()
    return stack, workers


def post_the_rest_and_check(
    stack: Stack,
    calls: dict[str, list[dict[str, Any]]],
    acked: dict[str, list[str]],
    workers: list[subprocess.Popen[bytes]],
    start: int,
) -> None:
    """Post each call's events from `start` on, then: every call applied exactly once and in
    order, and no worker exited."""
    rest = post_interleaved(stack, {c: e[start:] for c, e in calls.items()}, threads=4)
    for call_id, ids in rest.items():
        acked[call_id] += ids
    wait_until(lambda: all_ended(stack, sorted(calls)), 60, "every call to end")
    assert_applied_exactly_once_in_order(stack, calls, acked)
    assert all(worker.poll() is None for worker in workers), "a worker exited"


def test_a_killed_queue_server_loses_no_acknowledged_event_and_applies_none_twice(
    make_stack: MakeStack, queue_server: RedisServer
) -> None:
    """While the queue's server is down, events are still stored and acknowledged (the data
    server has them); once it is back, maintenance wakes the shards whose drain jobs were
    lost, and the workers and scheduler carry on without a restart. Drain jobs queued twice
    (a retried enqueue, a stale job) apply nothing twice."""
    stack, workers = running_on_own_queue(make_stack, queue_server)
    calls = traffic(40, "qdown")
    acked = post_interleaved(stack, {c: e[:1] for c, e in calls.items()}, threads=4)

    queue_server.kill()
    down = post_interleaved(stack, {c: e[1:2] for c, e in calls.items()}, threads=4)
    ready = stack.get("/readyz")
    assert ready.status_code == 503
    assert {"queue", "workers"} <= set(ready.json()["failing"])
    assert ready.json()["checks"]["redis"] == {"ok": True}
    queue_server.start()
    for call_id, ids in down.items():
        acked[call_id] += ids

    drains = Queue("callstate", connection=queue_server.client())
    for shard in range(8):  # doubled wake-ups: a job of a new id, and the flag's own again
        enqueue_drain(drains, shard, 60, new_wake_id())
        holder = stack.redis.client().get(stack.keys.wake(shard))
        if holder is not None:
            enqueue_drain(drains, shard, 60, text(holder))
    post_the_rest_and_check(stack, calls, acked, workers, start=2)
    assert stack.processes["scheduler"].poll() is None, "the scheduler exited"


def restart_empty(server: RedisServer) -> None:
    """SIGKILL, its files gone (a new machine, a server without persistence), started again on
    the same port."""
    server.kill()
    for item in server.data_dir.iterdir():
        if item.name != "server.log":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    server.start()


def test_a_queue_server_restarted_empty_leaves_the_service_ready_again(
    make_stack: MakeStack, queue_server: RedisServer
) -> None:
    """The data Redis kept every event, so maintenance queues the lost drains and every
    acknowledged event is applied once; the workers, which never stopped, must count as live
    again, or `/readyz` takes every web process out of the load balancer for good."""
    stack, workers = running_on_own_queue(make_stack, queue_server)
    calls = traffic(20, "qempty")
    acked = post_interleaved(stack, {c: e[:1] for c, e in calls.items()}, threads=4)
    wait_until(lambda: stack.get("/readyz").status_code == 200, 30, "ready before")
    # The workers idle, waiting on the queue (a busy one that fails a job's end starts anew).
    started = StartedJobRegistry("callstate", connection=queue_server.client())
    wait_until(
        lambda: started.count == 0 and stack.redis.client().get(stack.keys.wake(0)) is None,
        30,
        "the workers to idle",
    )

    restart_empty(queue_server)
    post_the_rest_and_check(stack, calls, acked, workers, start=1)
    # An idle worker heartbeats every 45 s; 60 s covers a heartbeat that registers it again.
    wait_until(lambda: stack.get("/readyz").status_code == 200, 60, "ready again")


def test_doctor_names_an_unsafe_queue_server(
    make_stack: MakeStack, queue_server: RedisServer
) -> None:
    """The queue's server holds the pending deliveries, each call's chain and the dead letters:
    evicting or forgetting them loses record revisions as surely as the data server would, so
    `callstate doctor` judges it too."""
    stack = make_stack(CALLSTATE_QUEUE_URL=queue_server.url)
    assert stack.cli("doctor").returncode == 0
    queue_server.client().config_set("maxmemory-policy", "allkeys-lru")
    unsafe = stack.cli("doctor")
    assert unsafe.returncode == 1, unsafe.stdout
    assert "maxmemory-policy" in unsafe.stdout


def test_the_queues_primary_failing_over_through_sentinel_loses_nothing(
    sentinels: SentinelSet, tmp_path: Path
) -> None:
    """CALLSTATE_QUEUE_SENTINEL_MASTER: the queue's primary and its replica watched by the same
    sentinels as the data's, under another name. The queue's primary is SIGKILLed under load:
    events are still stored and acknowledged, the sentinels promote its replica, the workers
    and the scheduler follow it without a restart, and every call is applied exactly once."""
    queue_primary = RedisServer(tmp_path / "queue-primary")
    queue_primary.start()
    queue_replica = RedisServer(tmp_path / "queue-replica", replica_of=queue_primary)
    queue_replica.start()
    watch_queue_primary(sentinels, queue_primary)
    stack = Stack(
        sentinels,
        tmp_path,
        {
            **sentinels.env,
            "CALLSTATE_QUEUE_SENTINEL_MASTER": QUEUES,
            "CALLSTATE_SHARDS": "4",
            "CALLSTATE_DRAIN_LOCK_SECONDS": "5",
            "CALLSTATE_MAINTENANCE_INTERVAL_SECONDS": "1",
        },
    )
    try:
        workers = stack.start_workers(2)
        stack.start_scheduler()
        stack.start_web(2)
        calls = traffic(40, "qsent")
        acked = post_interleaved(stack, {c: e[:1] for c, e in calls.items()}, threads=4)
        assert queue_primary.client().keys("rq:*") != []
        assert sentinels.client().keys("rq:*") == []

        queue_primary.kill()
        down = post_interleaved(stack, {c: e[1:2] for c, e in calls.items()}, threads=4)
        for call_id, ids in down.items():
            acked[call_id] += ids
        wait_until(lambda: queue_primary_port(sentinels) == queue_replica.port, 30, "failover")
        post_the_rest_and_check(stack, calls, acked, workers, start=2)
        assert stack.processes["scheduler"].poll() is None, "the scheduler exited"
        assert queue_replica.client().keys("rq:*") != []
    finally:
        stack.stop()
        print(stack.logs())
        queue_replica.stop()
        queue_primary.stop()


def queue_primary_port(sentinels: SentinelSet) -> int | None:
    """The queue's primary as the sentinels report it, None while they find none up."""
    try:
        return sentinels.primary_port(QUEUES)
    except MasterNotFoundError:
        return None


def watch_queue_primary(sentinels: SentinelSet, primary: RedisServer) -> None:
    """Have every sentinel watch `primary` as QUEUES, as quickly as it watches the data's."""
    quorum = len(sentinels.sentinels) // 2 + 1
    for sentinel in sentinels.sentinels:
        client = sentinel.client()
        client.sentinel_monitor(QUEUES, "127.0.0.1", primary.port, quorum)
        client.sentinel_set(QUEUES, "down-after-milliseconds", DOWN_AFTER_MS)
        client.sentinel_set(QUEUES, "failover-timeout", FAILOVER_TIMEOUT_MS)
    wait_until(lambda: sentinels.watched(QUEUES, replicas=1), 30, "the sentinels to watch it")
