"""Review of the shard holds (issue 12): interleavings and inputs that break a promise, each the
smallest reproduction found."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable

import fakeredis
import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from callstate.calls import Applied, LogEntry
from callstate.config import MAX_DRAIN_BATCH, Settings
from callstate.drain import Drainer
from callstate.eventlog import event_fields
from callstate.machine import CallMachine
from callstate.store import Store
from tests.factories import body, ended, event, published

CALL = "review-hold-1"


def holder_of_other_shards(
    store: Store, machine: CallMachine, wake: Callable[[int], None]
) -> Drainer:
    return Drainer(store, machine, batch=7, slice_ms=60_000, linger_ms=0, window_ms=0, wake=wake)


def test_a_job_that_finds_its_shard_held_wakes_for_what_the_holder_left_as_it_let_go(
    store: Store,
    drainer: Drainer,
    machine: CallMachine,
    wake: Callable[[int], None],
    woken: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """J is queued (the flag names J); H, a job that took J's shard as a free one, holds its
    lock. J fails to take the shard; before J passes its flag on, H lets go: lock, flag (not
    H's: a no-op), last look, whose wake finds the flag naming J and queues nothing. Then J,
    finding no holder, deletes the flag. The event logged after H's last read has no job: it
    waits for maintenance, with no crash anywhere."""
    _, shard, queued = store.log.append_event(CALL, body(event(CALL, "ringing", 1)))
    assert queued is not None
    holder_job = "drain-1-holder"
    holder = holder_of_other_shards(store, machine, wake)
    assert holder._take_shards(shard, holder_job) == [shard]
    assert store.coordination.wakes.holder(shard) == queued, "the queued job's flag stays"

    late: list[str | None] = []
    real_release = store.coordination.locks.release

    def release_after_a_late_event(shard_: int, token: str) -> bool:
        if token == holder_job and not late:
            _, _, late_job = store.log.append_event(CALL, body(event(CALL, "answered", 2)))
            late.append(late_job)
        return real_release(shard_, token)

    real_leave = store.coordination.leave_flag

    def holder_lets_go_first(shard_: int, wake_id: str) -> bool:
        # H ends its hold (its last read, then its let-go steps) between J's failed take and
        # J's passing of the flag.
        holder._drain_held(shard_, holder_job, time.monotonic() + 5)
        return real_leave(shard_, wake_id)

    monkeypatch.setattr(store.coordination.locks, "release", release_after_a_late_event)
    monkeypatch.setattr(store.coordination, "leave_flag", holder_lets_go_first)
    assert drainer.drain(shard, queued) == 0
    assert late == [None], "the late event found the flag naming J and queued nothing"
    assert store.log.has_backlog(shard), "the late event is not applied"
    assert woken == [shard] or store.coordination.wakes.holder(shard) is not None, (
        "no job is queued for the late event and the flag is free: a lost wake-up"
    )


def test_a_batch_as_large_as_the_settings_allow_commits(store: Store) -> None:
    """The commit script reads the entries' times in a loop, not by unpacking them into one
    Lua call (which Redis' Lua refuses past ~8,000 values), and the settings cap the batch so
    that no write of it comes near that many arguments."""
    shard, token = 0, "drain-1-big"
    log_ids = [f"{1_795_000_000_000 + n}-0" for n in range(MAX_DRAIN_BATCH)]
    assert store.coordination.locks.acquire(shard, token)
    committed = store.docs.commit(shard, token, None, log_ids, Applied(), {})
    assert committed
    assert store.log.cursor(shard) == log_ids[-1]
    with pytest.raises(ValueError, match="CALLSTATE_DRAIN_BATCH must be at most 2000"):
        Settings.from_env({"CALLSTATE_DRAIN_BATCH": str(MAX_DRAIN_BATCH + 1)})


def test_a_hold_that_fails_on_a_redis_timeout_leaves_no_event_behind(
    store: Store, drainer: Drainer, woken: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the flag names the holder, an event logged queues nothing: the holder's last look
    is its only wake-up. A hold that ends by an exception (here a 5 s socket timeout on one
    read, which the client does not retry) lets go of lock and flag in its `finally` but skips
    the look: the event waits for maintenance. Before the holds, the job let go of its flag as
    it started, and the event queued a job of its own."""
    _, shard, job = store.log.append_event(CALL, body(event(CALL, "ringing", 1)))
    assert job is not None
    late: list[str | None] = []
    real_read = store.log.read_entries

    def read_then_time_out(
        shard_: int, after: str | None, count: int, block_ms: int = 0
    ) -> list[LogEntry]:
        if after is None:
            return real_read(shard_, after, count, block_ms)
        _, _, late_job = store.log.append_event(CALL, body(event(CALL, "answered", 2)))
        late.append(late_job)
        raise RedisTimeoutError("Timeout reading from socket")

    monkeypatch.setattr(store.log, "read_entries", read_then_time_out)
    with pytest.raises(RedisTimeoutError):
        drainer.drain(shard, job)
    assert late == [None], "the late event found the flag naming the holder"
    assert store.log.has_backlog(shard)
    assert woken == [shard] or store.coordination.wakes.holder(shard) is not None, (
        "no job is queued for the late event and the flag is free: a lost wake-up"
    )


def test_a_job_whose_thread_fails_ends_only_after_its_other_threads_let_go(
    store: Store, machine: CallMachine, wake: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`drain` collects its threads with `[future.result() for future in others]`: the first
    failure raises out of it before the threads after it have ended. RQ then takes the job for
    over (and the worker runs its next job, or exits) while a thread of it still holds a shard
    and its flag, against the docstring's "every thread ends by `until`"."""
    release = threading.Event()
    real_read = store.log.read_entries

    def read(shard: int, after: str | None, count: int, block_ms: int = 0) -> list[LogEntry]:
        if shard == 1:
            raise RuntimeError("a bug in one thread")
        if shard == 2:
            release.wait(5)
        return real_read(shard, after, count, block_ms)

    monkeypatch.setattr(store.log, "read_entries", read)
    three = Drainer(
        store,
        machine,
        batch=7,
        slice_ms=60_000,
        linger_ms=0,
        window_ms=0,
        wake=wake,
        shards_per_job=lambda: 3,
    )
    try:
        with pytest.raises(RuntimeError):
            three.drain(0)
        still_held = store.redis.get(store.keys.drain_lock(2))
    finally:
        release.set()
    assert still_held is None, "the job ended while one of its threads still held shard 2"


STATUSES = ("created", "started", "ringing", "answered", "agentEnded", "ended", "ringing")


def drained_store(
    machine: CallMachine,
    settings: Settings,
    logged: list[tuple[str, dict[FieldT, EncodableT]]],
    keep_written: bool,
) -> tuple[object, ...]:
    redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    store = Store(redis, dataclasses.replace(settings, shards=1))
    for log_id, fields in logged:
        redis.xadd(store.keys.log(0), fields, id=log_id)
    hold = Drainer(
        store, machine, batch=2, slice_ms=60_000, linger_ms=0, window_ms=0, wake=lambda _: None
    )
    if not keep_written:
        hold._remember = lambda written, applied: None  # type: ignore[method-assign]
    applied = hold.drain(0)
    docs = {key: redis.get(key) for key in sorted(redis.keys(store.keys.call("*")))}
    # The records' own entry ids are the commit's time: only their fields compare.
    records = [fields for _, fields in published(redis, store.keys)]
    return (
        applied,
        docs,
        records,
        redis.hgetall(store.keys.history(0)),
        redis.hgetall(store.keys.verdicts(0)),
    )


@pytest.mark.parametrize("seed", range(40))
def test_a_hold_that_keeps_what_it_wrote_leaves_the_store_as_one_that_reads_it_back(
    machine: CallMachine, settings: Settings, seed: int
) -> None:
    """What held: batches of two over three calls (accepted, duplicate, late, ended, set-aside
    entries), drained by one hold with and without its `written` documents, store the same."""
    rnd = random.Random(seed)
    logged: list[tuple[str, dict[FieldT, EncodableT]]] = []
    for n in range(rnd.randint(1, 14)):
        call = f"review-cache-{rnd.randint(0, 2)}"
        ts = 1_515_859_261_000 + rnd.randint(0, 20) * 1000
        roll = rnd.random()
        if roll < 0.1:
            fields: dict[FieldT, EncodableT] = {"call_id": call, "event": b"not packed"}
        elif roll < 0.3:
            fields = event_fields(call, body(ended(call, ts, "486 Busy Here", rnd.randint(0, 5))))
        else:
            fields = event_fields(call, body(event(call, rnd.choice(STATUSES), ts)))
        logged.append((f"{1_795_000_000_000 + n}-0", fields))
    assert drained_store(machine, settings, logged, True) == drained_store(
        machine, settings, logged, False
    )
