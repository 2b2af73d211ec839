"""The drainer's two no-lost-wake-up steps, each at the exact point where it matters."""

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


def test_an_event_logged_after_a_job_started_queues_a_new_job(
    store: Store, drainer: Drainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job clears its wake flag as it starts: else this event queues nothing, and the flag
    stands for a job that has already run."""
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
    drainer.drain(shard, job)
    [successor] = claimed_meanwhile
    assert successor is not None, "the event logged after the job started claimed the flag"
    assert store.coordination.wakes.holder(shard) == successor


def test_the_holder_looks_again_for_an_event_whose_own_job_found_the_lock_held(
    store: Store,
    drainer: Drainer,
    machine: CallMachine,
    wake: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The late event's job left because the shard was locked: only the holder's second look,
    after it lets go, applies that event."""
    _, shard, job = store.log.append_event(CALL, body(event(CALL, "ringing", 1)))
    assert job is not None
    other = another_worker(store, machine, wake)
    late: list[tuple[str, str | None, int]] = []
    real_release = store.coordination.locks.release

    def release_after_a_late_event_and_its_job(shard_: int, token: str) -> bool:
        if not late:
            # After the holder's last read, while it still holds the lock.
            assert store.redis.get(store.keys.drain_lock(shard_)) == token.encode()
            log_id, _, late_job = store.log.append_event(CALL, body(event(CALL, "answered", 2)))
            late.append((log_id, late_job, other.drain(shard_, late_job)))
        return real_release(shard_, token)

    monkeypatch.setattr(store.coordination.locks, "release", release_after_a_late_event_and_its_job)
    applied = drainer.drain(shard, job)
    [(late_log_id, late_job, applied_by_late_job)] = late
    assert late_job is not None, "the late event queued a job: the holder cleared the flag"
    assert applied_by_late_job == 0, "that job ran, found the shard locked and left"
    assert store.coordination.wakes.holder(shard) is None, (
        "no job is queued for the late event any more"
    )
    assert applied == 2
    assert store.log.cursor(shard) == late_log_id == store.log.last_log_id(shard)
    doc = store.docs.get_doc(CALL)
    assert doc is not None and doc["status"] == "answered"
