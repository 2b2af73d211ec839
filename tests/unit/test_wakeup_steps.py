"""The drainer's no-lost-wake-up steps, each at the exact point where it matters."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from callstate.calls import LogEntry
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.store import Store
from tests.factories import body, event

CALL = "wake-step-1"


def another_worker(store: Store, machine: CallMachine, wake: Callable[[int], None]) -> Drainer:
    return Drainer(store, machine, batch=7, slice_ms=60_000, linger_ms=0, window_ms=0, wake=wake)


def test_an_event_logged_while_a_job_holds_its_shard_queues_nothing_and_is_applied(
    store: Store, drainer: Drainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flag names the job while it holds the shard: the event needs no job of its own, the
    holder reads it, and lets go of the flag as it leaves."""
    _, shard, job = store.log.append_event(CALL, body(event(CALL, "ringing", 1)))
    assert job is not None
    claimed_meanwhile: list[str | None] = []
    real_read = store.log.read_entries

    def read_after_an_event_is_logged(
        shard_: int, after: str | None, count: int, block_ms: int = 0
    ) -> list[LogEntry]:
        if not claimed_meanwhile:
            _, _, wake_id = store.log.append_event(CALL, body(event(CALL, "answered", 2)))
            claimed_meanwhile.append(wake_id)
        return real_read(shard_, after, count, block_ms)

    monkeypatch.setattr(store.log, "read_entries", read_after_an_event_is_logged)
    assert drainer.drain(shard, job) == 2
    assert claimed_meanwhile == [None], "the flag named the holding job"
    assert store.coordination.wakes.holder(shard) is None, "let go of as the job left"


def test_the_holder_looks_again_for_an_event_logged_after_its_last_read(
    store: Store,
    drainer: Drainer,
    machine: CallMachine,
    woken: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The late event found the flag naming the holder and queued nothing: only the holder's
    look after letting go of lock and flag finds it, and wakes the job that applies it."""
    _, shard, job = store.log.append_event(CALL, body(event(CALL, "ringing", 1)))
    assert job is not None
    late: list[tuple[str, str | None]] = []
    real_release = store.coordination.locks.release

    def release_after_a_late_event(shard_: int, token: str) -> bool:
        if not late:
            # After the holder's last read, while it still holds the lock.
            assert store.redis.get(store.keys.drain_lock(shard_)) == token.encode()
            log_id, _, late_job = store.log.append_event(CALL, body(event(CALL, "answered", 2)))
            late.append((log_id, late_job))
        return real_release(shard_, token)

    monkeypatch.setattr(store.coordination.locks, "release", release_after_a_late_event)
    assert drainer.drain(shard, job) == 1
    [(late_log_id, late_job)] = late
    assert late_job is None, "the flag named the holder"
    assert woken == [shard], "the holder's last look woke a successor"
    successor = store.coordination.wakes.holder(shard)
    assert successor is not None
    assert another_worker(store, machine, lambda shard: None).drain(shard, successor) == 1
    assert store.log.cursor(shard) == late_log_id == store.log.last_log_id(shard)
    doc = store.docs.get_doc(CALL)
    assert doc is not None and doc["status"] == "answered"


def test_a_job_that_finds_its_shard_held_lets_go_of_its_flag_at_once(
    store: Store, drainer: Drainer
) -> None:
    """Else the flag would name a job that has left, and no later event would queue one."""
    _, shard, job = store.log.append_event(CALL, body(event(CALL, "ringing", 1)))
    assert job is not None and store.coordination.locks.acquire(shard, "a snapshot step")
    assert drainer.drain(shard, job) == 0
    assert store.coordination.wakes.holder(shard) is None
    _, _, next_job = store.log.append_event(CALL, body(event(CALL, "answered", 2)))
    assert next_job is not None


def test_a_job_that_finds_its_shard_held_by_a_drain_job_passes_its_flag_to_it(
    store: Store, drainer: Drainer, machine: CallMachine, woken: list[int]
) -> None:
    """Events keep needing no job while a job holds the shard, even one that took it while
    another job was queued for it; that holder lets go of the flag as it leaves."""
    _, shard, queued = store.log.append_event(CALL, body(event(CALL, "ringing", 1)))
    assert queued is not None
    holder = "drain-1-holder"
    assert store.coordination.locks.acquire(shard, holder)
    assert drainer.drain(shard, queued) == 0
    assert store.coordination.wakes.holder(shard) == holder
    assert store.coordination.held_by_its_flag(shard), "maintenance takes it for a live drain"
    _, _, during = store.log.append_event(CALL, body(event(CALL, "answered", 2)))
    assert during is None, "the flag names the holder"
    store.coordination.locks.release(shard, holder)
    store.coordination.wakes.clear(shard, holder)
    assert store.coordination.wakes.holder(shard) is None
