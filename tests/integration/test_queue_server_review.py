"""Review of CALLSTATE_QUEUE_URL (issue 13, part 1) with real processes: the queue's server
restarted empty under a running pipeline."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rq.registry import StartedJobRegistry

from tests.integration.stack import RedisServer, Stack, wait_until
from tests.integration.test_reliability import (
    all_ended,
    assert_applied_exactly_once_in_order,
    post_interleaved,
    traffic,
)

pytestmark = pytest.mark.ha
MakeStack = Callable[..., Stack]


@pytest.fixture
def queue_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "queue")
    server.start()
    yield server
    server.stop()


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
    stack = make_stack(
        CALLSTATE_QUEUE_URL=queue_server.url, CALLSTATE_MAINTENANCE_INTERVAL_SECONDS="1"
    )
    stack.start_web()
    workers = stack.start_workers(2)
    stack.start_scheduler()
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
    rest = post_interleaved(stack, {c: e[1:] for c, e in calls.items()}, threads=4)
    for call_id, ids in rest.items():
        acked[call_id] += ids
    wait_until(lambda: all_ended(stack, sorted(calls)), 60, "every call to end")
    assert_applied_exactly_once_in_order(stack, calls, acked)
    assert all(worker.poll() is None for worker in workers), "a worker exited"
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
