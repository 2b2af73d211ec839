"""Wake-ups: a shard never has two queued drain jobs, and no logged event is left unapplied,
whatever the order in which webhooks, drain jobs and maintenance interleave."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, TypeVar
from unittest.mock import patch

import fakeredis
import pytest
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st
from redis import Redis
from rq.job import Job

from callstate import coordination, drain, jobs
from callstate.calls import LogEntry
from callstate.config import Settings
from callstate.store import Store
from callstate.web import create_app
from tests.factories import body, event

JSON = {"Content-Type": "application/json"}
CALLS = ("wake-a", "wake-b", "wake-e")  # one per shard of three
T = TypeVar("T")


class InlineThreads(Executor):
    """A drain job's other shards drained in the caller's thread, at once: the interleavings
    stay the ones the test chooses."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class World:
    """The web, RQ's queue and drain jobs on one fakeredis (or the queue on a second one),
    stepped in a chosen order. A drain job takes `shards_per_job` shards (with no worker
    registered, the default takes every one), draining the others first, in the same thread."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        shards_per_job: int = 0,
        queue_redis: Redis | None = None,
    ) -> None:
        self.context = jobs.configure(settings, redis, queue_redis)
        if shards_per_job:
            self.context.drainer.shards_per_job = lambda: shards_per_job
        self.client: FlaskClient = create_app(settings, redis, queue_redis).test_client()
        self.store: Store = self.context.store
        self.sent = 0
        self.most_queued = 0

    def queued_drains(self) -> dict[int, int]:
        found: dict[int, int] = {}
        for job in self.context.queue.get_jobs():
            if job.func_name == jobs.DRAIN_JOB:
                found[job.args[0]] = found.get(job.args[0], 0) + 1
        self.most_queued = max([self.most_queued, *found.values()])
        return found

    def post(self, call_id: str) -> None:
        self.sent += 1
        payload = event(call_id, ("ringing", "agentEnded")[self.sent % 2], self.sent)
        assert (
            self.client.post("/webhooks/stringee", data=body(payload), headers=JSON).status_code
            == 200
        )

    def run_one_job(self) -> bool:
        """What a worker does: take the oldest queued job and run it."""
        if self.context.queue.count == 0:
            return False
        job = Job.fetch(str(self.context.queue.pop_job_id()), connection=self.store.queue_redis)
        if job.func_name == jobs.DRAIN_JOB:
            jobs.drain_shard(*job.args)
        return True

    def act(self, action: tuple[str, int]) -> None:
        kind, n = action
        if kind == "post":
            self.post(CALLS[n % len(CALLS)])
        elif kind == "maintain":
            jobs.maintain()
        else:
            self.run_one_job()
        self.queued_drains()


def world(slice_ms: int, batch: int, shards_per_job: int, separate: bool = False) -> World:
    redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    queue_redis = fakeredis.FakeRedis(server=fakeredis.FakeServer()) if separate else None
    base = Settings(redis_url="redis://fake", embedded_redis=False, var_dir=Path("var"), shards=3)
    tuned = dataclasses.replace(
        base, drain_slice_ms=slice_ms, drain_batch=batch, drain_linger_ms=0, drain_window_ms=0
    )
    return World(tuned, redis, shards_per_job, queue_redis)


actions = st.lists(
    st.tuples(st.sampled_from(["post", "post", "post", "maintain", "run"]), st.integers(0, 2)),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    steps=actions,
    inside=actions,
    slice_ms=st.sampled_from([0, 60_000]),
    batch=st.sampled_from([1, 2, 50]),
    shards_per_job=st.sampled_from([1, 2, 3]),
    separate=st.booleans(),
)
def test_one_queued_drain_per_shard_and_no_lost_wake_up(
    steps: list[tuple[str, int]],
    inside: list[tuple[str, int]],
    slice_ms: int,
    batch: int,
    shards_per_job: int,
    separate: bool,
) -> None:
    """`inside` actions happen while a drain job is between two reads of the log, as another
    process would interleave with it; nested once, so a job can start while another drains.
    A job takes one, two or all three shards; RQ's queue is on the data Redis or on its own."""
    with patch.object(drain, "ThreadPoolExecutor", InlineThreads):
        w = world(slice_ms, batch, shards_per_job, separate)
        act_in_any_order(w, steps, iter(inside))


def act_in_any_order(
    w: World, steps: list[tuple[str, int]], pending: Iterator[tuple[str, int]]
) -> None:
    depth = {"now": 0}

    def others_act(times: int) -> None:
        if depth["now"] < 2:
            depth["now"] += 1
            try:
                for _ in range(times):
                    w.act(next(pending, ("nothing", 0)))
            finally:
                depth["now"] -= 1

    real_read, real_release = w.store.log.read_entries, w.store.coordination.locks.release

    def read_while_others_act(
        shard: int, after: str | None, count: int, block_ms: int = 0
    ) -> list[LogEntry]:
        others_act(1)
        return real_read(shard, after, count, block_ms)

    def release_after_others_act(shard: int, token: str) -> bool:
        # After the holder's last read and before it lets go: an event, then a job that
        # finds the shard still locked, is the race the holder's second look is for.
        others_act(2)
        return real_release(shard, token)

    w.store.log.read_entries = read_while_others_act  # type: ignore[method-assign]
    w.store.coordination.locks.release = release_after_others_act  # type: ignore[method-assign]
    for action in steps:
        w.act(action)
        assert max(w.queued_drains().values(), default=0) <= 1
    assert w.most_queued <= 1
    w.store.log.read_entries = real_read  # type: ignore[method-assign]
    w.store.coordination.locks.release = real_release  # type: ignore[method-assign]
    for _ in range(100):
        if not w.run_one_job():
            break
    assert not any(w.store.log.has_backlog(shard) for shard in range(w.store.settings.shards))
    assert w.store.docs.applied_count() == w.sent


def test_a_burst_a_successor_and_maintenance_queue_one_job(
    settings: Settings, redis: Redis
) -> None:
    w = World(dataclasses.replace(settings, shards=1, drain_slice_ms=0, drain_batch=2), redis)
    w.context.drainer.stopping = lambda: True  # so a used-up slice hands over
    for _ in range(10):
        w.post("burst")
    assert w.queued_drains() == {0: 1}
    jobs.maintain()
    assert w.queued_drains() == {0: 1}
    assert w.run_one_job()  # a used-up slice: it hands over to one successor
    assert w.queued_drains() == {0: 1}
    w.post("burst")
    jobs.maintain()
    assert w.queued_drains() == {0: 1}
    while w.run_one_job():
        pass
    assert w.store.docs.applied_count() == 11
    assert w.queued_drains() == {}


def test_an_event_logged_while_a_job_holds_its_shard_is_applied_by_it_or_its_successor(
    settings: Settings, redis: Redis
) -> None:
    """The flag names the holding job, so the event queues nothing; logged after the holder's
    last read, it is found by the holder's look after letting go, which wakes one successor."""
    w = World(dataclasses.replace(settings, shards=1), redis)
    w.post("race")
    real_release = w.store.coordination.locks.release
    raced: list[bool] = []

    def release_after_a_race(shard: int, token: str) -> bool:
        if not raced:
            raced.append(w.sent == 1)
            w.post("race")  # after the holder's last read
            raced.append(w.queued_drains() == {})
        return real_release(shard, token)

    w.store.coordination.locks.release = release_after_a_race  # type: ignore[method-assign]
    assert w.run_one_job()
    assert raced == [True, True], "the event found the flag naming the holder: no job queued"
    assert w.store.docs.applied_count() == 1
    assert w.queued_drains() == {0: 1}, "the holder's last look woke one successor"
    assert w.run_one_job()
    assert w.store.docs.applied_count() == 2
    assert w.queued_drains() == {}


def test_a_job_waiting_long_in_the_queue_is_never_doubled(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers away for minutes: the flag has no TTL, and maintenance sees the job is queued."""
    w = World(dataclasses.replace(settings, shards=1), redis)
    w.post("waiting")
    monkeypatch.setattr(coordination, "LOST_WAKE_GRACE_MS", 0)
    for _ in range(3):
        jobs.maintain()
        w.post("waiting")
    assert w.queued_drains() == {0: 1}
    while w.run_one_job():
        pass
    assert w.store.docs.applied_count() == 4 and w.store.coordination.wakes.holder(0) is None


def test_a_job_takes_free_shards_and_looks_again_at_each_after_letting_go(
    settings: Settings, redis: Redis
) -> None:
    """A job queued for an idle shard takes the other two as well and applies their events; an
    event that came to one of them after its last read, and whose own job found it held, is
    applied by the holder's second look, so no job is left queued and nothing waits."""
    with patch.object(drain, "ThreadPoolExecutor", InlineThreads):
        quick = dataclasses.replace(settings, shards=3, drain_slice_ms=60_000, drain_linger_ms=20)
        w = World(quick, redis, shards_per_job=3)
        for call_id in CALLS[:2]:
            w.post(call_id)
        idle = w.store.keys.shard_of(CALLS[2])
        w.store.redis.delete(*(w.store.keys.wake(shard) for shard in range(3)))
        w.store.redis.delete(w.context.queue.key)
        real_release = w.store.coordination.locks.release
        late: list[int] = []

        def release_after_a_late_event(shard: int, token: str) -> bool:
            if shard != idle and not late:
                late.append(shard)
                w.post(CALLS[[w.store.keys.shard_of(c) for c in CALLS].index(shard)])
                assert w.queued_drains() == {}, "the job holds that shard's flag too"
            return real_release(shard, token)

        w.store.coordination.locks.release = release_after_a_late_event  # type: ignore[method-assign]
        jobs.enqueue_drain(w.context.queue, idle, 60)
        assert w.run_one_job()
        assert late, "the job took a shard other than its own"
        assert w.store.docs.applied_count() == 2
        assert w.queued_drains() == {late[0]: 1}, "its last look at that shard woke a successor"
        assert w.run_one_job()
        assert w.store.docs.applied_count() == 3
        assert w.queued_drains() == {}
