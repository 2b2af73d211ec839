"""workers/failover.py `work_through_failovers` against RQ's own worker loop (fakeredis): a stop
asked for ends the process, a loop ended by Redis starts a new worker, leaving nothing behind."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from workers import failover
from workers.failover import StoppableWorker, work_through_failovers


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pause between two workers keeps a real process from a busy loop; here it is waste."""
    monkeypatch.setattr(failover, "RESTART_PAUSE_SECONDS", 0.0)


@pytest.fixture(autouse=True)
def keep_signal_handlers() -> Iterator[None]:
    """RQ's worker installs its own SIGINT/SIGTERM handlers; the test runner's come back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


class StopAskedWorker(StoppableWorker):
    """SIGTERM while idle, as a process manager sends it: RQ's own handler runs."""

    def dequeue_job_and_maintain_ttl(self, timeout: Any, max_idle_time: Any = None) -> Any:
        self.request_stop(signal.SIGTERM, None)


class HungPrimaryWorker(StoppableWorker):
    """Its blocking dequeue ends in a socket timeout, as on a primary that hangs (SIGSTOP, a
    network partition: no reset, no refusal) while the sentinels promote a replica; the worker's
    own teardown then reaches the new primary."""

    def dequeue_job_and_maintain_ttl(self, timeout: Any, max_idle_time: Any = None) -> Any:
        raise RedisTimeoutError("Timeout reading from socket")


class StoppedWhileRedisDownWorker(StopAskedWorker):
    """SIGTERM while Redis is down: RQ's handler raises StopRequested in its retry loop (an idle
    worker: `_stop_requested` stays False), then its teardown cannot reach Redis."""

    def register_death(self) -> None:
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def run(redis: Redis, *worker_classes: type[StoppableWorker]) -> list[StoppableWorker]:
    """Run `work_through_failovers` with workers of these classes in turn (then StopAskedWorker
    ones); the workers it started."""
    started: list[StoppableWorker] = []

    def new_worker() -> StoppableWorker:
        worker_class = (
            worker_classes[len(started)] if len(started) < len(worker_classes) else StopAskedWorker
        )
        started.append(worker_class(["q"], connection=redis))
        return started[-1]

    work_through_failovers(new_worker, redis)
    return started


def test_a_worker_whose_primary_hung_is_replaced_not_ended(redis: Redis) -> None:
    """RQ's loop catches redis TimeoutError itself ("Redis connection timeout, quitting...")
    and work() returns normally once the teardown succeeds: the wrapper returns and the
    process exits (under `make run`, taking every process with it)."""
    started = run(redis, HungPrimaryWorker)
    assert len(started) == 2, "the worker's loop ended on a Redis timeout and none replaced it"


def test_a_worker_asked_to_stop_while_redis_is_down_stops(redis: Redis) -> None:
    """RQ sets `_stop_requested` only for a busy worker; an idle one gets StopRequested raised
    instead, so the wrapper takes the stop for a lost Redis, waits for it and starts a new
    worker: the warm shutdown asked for is forgotten."""
    started = run(redis, StoppedWhileRedisDownWorker)
    assert len(started) == 1, "a worker asked to stop was replaced by a new one"


class LostRedisWorker(StoppableWorker):
    """Redis fails under a job (RQ: "found an unhandled exception, quitting...") and again under
    the teardown, which then never reaches `unsubscribe()`."""

    def dequeue_job_and_maintain_ttl(self, timeout: Any, max_idle_time: Any = None) -> Any:
        raise ResponseError("READONLY You can't write against a read only replica.")

    def register_death(self) -> None:
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def test_a_replaced_worker_leaves_no_thread_behind(redis: Redis) -> None:
    """RQ's pubsub thread of the worker that lost Redis keeps running (it retries every 2 s,
    logging "could not connect" under the dead worker's name, as in test_sentinel's logs): one
    more thread and connection per worker process at every failover."""
    lost, _ = run(redis, LostRedisWorker)
    assert lost.pubsub_thread is not None
    assert not lost.pubsub_thread.is_alive(), "the lost worker's pubsub thread still runs"


def test_a_heartbeat_registers_again_a_worker_its_server_forgot(redis: Redis) -> None:
    """The queue's server lost its data (restarted empty, flushed) while the worker's client
    reconnected by itself: the next heartbeat puts the worker back in RQ's registry, where
    `/readyz` counts live workers."""
    worker = StoppableWorker(["q"], connection=redis)
    worker.register_birth()  # type: ignore[no-untyped-call]
    redis.flushall()
    worker.heartbeat()
    assert [w.name for w in StoppableWorker.all(connection=redis)] == [worker.name]
    assert redis.hget(worker.key, "death") is None
