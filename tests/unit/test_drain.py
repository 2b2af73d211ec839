"""The drainer: log order per shard, batches committed once, fenced by the shard cursor."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from callstate.calls import LogEntry, apply_batch
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.store import Store
from tests.factories import body, event


def log_events(store: Store, call_id: str, count: int) -> int:
    shard = 0
    for n in range(count):
        status = "ringing" if n % 2 == 0 else "agentEnded"
        _, shard, _ = store.log.append_event(call_id, body(event(call_id, status, 1000 + n)))
    return shard


def test_drain_applies_the_whole_backlog_in_batches_in_order(
    store: Store, drainer: Drainer
) -> None:
    shard = log_events(store, "c-1", 20)
    assert store.log.has_backlog(shard)
    assert drainer.drain(shard) == 20
    doc = store.docs.get_doc("c-1")
    assert doc is not None
    assert [item["timestamp_ms"] for item in doc["journal"]] == list(range(1000, 1020))
    assert {item["verdict"] for item in doc["journal"]} == {"accepted"}
    assert not store.log.has_backlog(shard)
    assert drainer.drain(shard) == 0
    assert store.docs.applied_count() == 20


def test_commit_is_refused_when_another_drainer_moved_the_cursor(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    shard = log_events(store, "c-1", 3)
    entries = store.log.read_entries(shard, None, 10)
    docs = store.docs.load_docs({"c-1"})
    applied = apply_batch(docs, dict, entries, machine, store.settings.call_limits)
    assert drainer.drain(shard) == 3
    winner = store.docs.get_doc("c-1")
    assert store.coordination.locks.acquire(shard, "late")
    late = store.docs.commit(
        shard, "late", None, [e.log_id for e in entries], applied, {"c-1": store.docs.prior(None)}
    )
    assert late is False
    assert store.docs.get_doc("c-1") == winner
    assert store.docs.applied_count() == 3
    assert winner is not None
    assert winner["counts"]["accepted"] == 3


def test_commit_is_refused_to_a_drainer_that_lost_its_lock(
    store: Store, machine: CallMachine
) -> None:
    """A drainer whose lock expired (or was taken by a snapshot step or a rebuild) commits
    nothing, even at the right cursor: what it read may have been changed under it."""
    shard = log_events(store, "c-1", 2)
    entries = store.log.read_entries(shard, None, 10)
    applied = apply_batch(
        store.docs.load_docs({"c-1"}), dict, entries, machine, store.settings.call_limits
    )

    def commit(token: str) -> bool:
        log_ids = [entry.log_id for entry in entries]
        return store.docs.commit(
            shard, token, None, log_ids, applied, {"c-1": store.docs.prior(None)}
        )

    assert not commit("expired"), "no lock at all"
    assert store.coordination.locks.acquire(shard, "snapshot-step")
    assert not commit("expired"), "the lock is someone else's"
    assert store.docs.get_doc("c-1") is None and store.log.cursor(shard) is None
    assert commit("snapshot-step")


def test_drain_leaves_a_locked_shard_to_its_holder(store: Store, drainer: Drainer) -> None:
    shard = log_events(store, "c-1", 2)
    assert store.coordination.locks.acquire(shard, "other")
    assert drainer.drain(shard) == 0
    assert store.log.has_backlog(shard)
    assert not store.coordination.locks.release(shard, "not-mine")
    assert store.coordination.locks.release(shard, "other")
    assert drainer.drain(shard) == 2


def test_drain_clears_the_wake_flag_so_the_next_event_wakes_a_new_job(
    store: Store, drainer: Drainer
) -> None:
    _, shard, first = store.log.append_event("c-1", body(event("c-1", "ringing", 1)))
    _, _, second = store.log.append_event("c-1", body(event("c-1", "answered", 2)))
    assert first is not None and second is None
    drainer.drain(shard, "another job")
    _, _, still = store.log.append_event("c-1", body(event("c-1", "answered", 3)))
    assert still is None, "a job clears only the flag that stands for it"
    drainer.drain(shard, first)
    _, _, after_drain = store.log.append_event("c-1", body(event("c-1", "ended", 4)))
    assert after_drain is not None


def small_drainer(
    store: Store, machine: CallMachine, slice_ms: int, wake: Callable[[int], None]
) -> Drainer:
    return Drainer(
        store,
        machine,
        batch=2,
        slice_ms=slice_ms,
        linger_ms=0,
        window_ms=0,
        wake=wake,
    )


def test_each_commit_renews_the_drain_lock(
    store: Store, machine: CallMachine, wake: Callable[[int], None]
) -> None:
    """A drainer that keeps committing keeps its lock: each commit sets the TTL back to
    drain_lock_seconds, here from far above it, so no clock decides the outcome."""
    shard = log_events(store, "c-1", 1)
    lock = store.keys.drain_lock(shard)
    configured_ms = store.settings.drain_lock_seconds * 1000
    assert store.coordination.locks.acquire(shard, "mine")
    store.redis.pexpire(lock, configured_ms * 100)
    drainer = small_drainer(store, machine, 60_000, wake)
    assert drainer._drain_while_held(shard, "mine", time.monotonic() + 60) == (1, True)
    assert store.redis.get(lock) == b"mine"
    assert 0 < store.redis.pttl(lock) <= configured_ms


def test_a_used_up_slice_hands_the_shard_to_a_new_job(
    store: Store, machine: CallMachine, wake: Callable[[int], None], woken: list[int]
) -> None:
    shard = log_events(store, "c-1", 6)
    assert (
        small_drainer(store, machine, 0, wake).drain(shard, store.coordination.wakes.holder(shard))
        == 2
    )
    assert woken == [shard]
    assert store.log.has_backlog(shard)
    _, _, claimed = store.log.append_event("c-1", body(event("c-1", "ended", 9999)))
    assert claimed is None, "the queued successor will drain it; no second job"
    successor = small_drainer(store, machine, 60_000, wake)
    assert successor.drain(shard, store.coordination.wakes.holder(shard)) == 5
    assert woken == [shard]


def test_a_lingering_drain_applies_events_logged_while_it_waits(
    store: Store, machine: CallMachine, wake: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = log_events(store, "c-1", 1)
    lingering = Drainer(
        store,
        machine,
        batch=5,
        slice_ms=60_000,
        linger_ms=50,
        window_ms=1,
        wake=wake,
    )
    blocking_reads: list[int] = []
    real_read = store.log.read_entries

    def read_and_log_one_while_blocked(
        shard_: int, after: str | None, count: int, block_ms: int = 0
    ) -> list[LogEntry]:
        if block_ms:
            blocking_reads.append(block_ms)
            if len(blocking_reads) == 1:
                store.log.append_event("c-1", body(event("c-1", "answered", 5000)))
        return real_read(shard_, after, count, block_ms)

    monkeypatch.setattr(store.log, "read_entries", read_and_log_one_while_blocked)
    assert lingering.drain(shard) == 2
    assert 40 <= blocking_reads[0] <= 50, "the linger, less the time since the last commit"
    assert len(blocking_reads) == 2, "waited again after the late event, then finished"
    assert not store.log.has_backlog(shard)


def test_an_unprocessable_entry_is_quarantined_with_where_it_is_and_why(
    store: Store, drainer: Drainer, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator finds a set-aside entry by its log id and shard, with the error's class,
    never its payload."""
    shard = store.keys.shard_of("c-9")
    added = store.redis.xadd(store.keys.log(shard), {"call_id": "c-9", "event": b"\x01junk"})
    log_id = added.decode() if isinstance(added, bytes) else added
    before_ms = store.log.server_time_ms()
    with caplog.at_level("ERROR"):
        drainer.drain(shard)
    [item] = store.quarantine.recent(5)
    assert before_ms <= item.pop("received_ms") <= store.log.server_time_ms()
    assert item == {
        "status": None,
        "error": "unprocessable",
        "field": None,
        "message": "applying the logged entry raised zlib.error",
        "log_id": log_id,
        "shard": shard,
        "call_id": "c-9",
    }
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line == (
        f"shard {shard}: log entry {log_id} (call c-9) could not be applied (zlib.error); set aside"
    )


def test_an_unreadable_call_id_is_logged_as_such(
    store: Store, drainer: Drainer, caplog: pytest.LogCaptureFixture
) -> None:
    store.redis.xadd(store.keys.log(0), {"call_id": b"", "event": b"x"})
    with caplog.at_level("ERROR"):
        drainer.drain(0)
    assert "(call unreadable)" in caplog.text


def test_a_holder_hands_over_a_wanted_shard_and_no_drain_job_takes_it_meanwhile(
    store: Store, machine: CallMachine, wake: Callable[[int], None]
) -> None:
    """A snapshot step, a trim or a rebuild marks the lock wanted while it waits: the holder
    stops keeping the shard at its slice's end, and a new drain job does not take it."""
    holder = Drainer(store, machine, 5, 250, 1000, 0, wake, others_waiting=lambda: False)
    locks = store.coordination.locks
    assert locks.acquire(0, "drain-1-job")
    assert holder._keep(0, "drain-1-job", time.monotonic() + 60), "nobody wants it: kept"
    store.redis.set(store.keys.drain_lock_wanted(0), "a rebuild")
    assert not holder._keep(0, "drain-1-job", time.monotonic() + 60)
    assert locks.release(0, "drain-1-job")
    assert not locks.acquire_unless_wanted(0, "drain-2-job"), "the waiter gets it first"
    assert locks.acquire_waiting(0, "a rebuild", 1.0)
    assert not store.redis.exists(store.keys.drain_lock_wanted(0)), "no longer wanted once held"


def test_a_holder_hands_over_to_a_job_only_once_it_has_waited_a_whole_slice(
    store: Store, machine: CallMachine, wake: Callable[[int], None]
) -> None:
    """A job queued while a worker is idle is taken at once; one still queued a slice later
    has no worker but the holder's, which then lets go."""
    asked: list[bool] = []

    def another_job_waits() -> bool:
        asked.append(True)
        return True

    shard = log_events(store, "c-1", 1)
    holder = Drainer(store, machine, 5, 1, 1000, 0, wake, others_waiting=another_job_waits)
    assert store.coordination.locks.acquire(shard, "drain-1-job")
    assert holder._drain_while_held(shard, "drain-1-job", time.monotonic() + 60) == (1, True)
    assert len(asked) == 2, "kept through the first slice's end, handed over at the second"


def test_a_job_hands_the_shards_beyond_its_share_over_when_more_workers_run(
    store: Store, machine: CallMachine, wake: Callable[[int], None], woken: list[int]
) -> None:
    """A job that started with every shard (one worker registered) keeps its own and lets go of
    the others at their slices' end once the share drops (more workers started), leaving no
    event unseen; it does not wait for its linger or longest hold."""
    share = [store.settings.shards]
    job = Drainer(
        store,
        machine,
        batch=7,
        slice_ms=50,
        linger_ms=30_000,
        window_ms=0,
        wake=wake,
        shards_per_job=lambda: share[0],
        others_waiting=lambda: False,
    )
    locks = store.coordination.locks
    shards = range(store.settings.shards)

    def held(shard: int) -> bool:
        return bool(store.redis.exists(store.keys.drain_lock(shard)))

    running = threading.Thread(target=job.drain, args=(0,))
    running.start()
    try:
        wait_for(lambda: all(held(shard) for shard in shards), "every shard held")
        ids = (f"share-{n}" for n in range(1000))
        one_per_shard = {store.keys.shard_of(call_id): call_id for call_id in ids}
        for shard in shards:
            log_events(store, one_per_shard[shard], 1)
        share[0] = 2
        wait_for(lambda: sum(1 for shard in shards if held(shard)) == 2, "two shards let go")
        assert held(0), "the job let go of its own shard"
        let_go = [shard for shard in shards if not held(shard)]
        # A shard whose last slice had events is woken; one whose event was applied in an
        # earlier slice has nothing left: either way no event waits unseen.
        assert set(woken) <= set(let_go)
        assert not [s for s in let_go if s not in woken and store.log.has_backlog(s)]
    finally:
        # Ends the hold: a waiter that wants a shard gets it at the holder's slice's end.
        for shard in shards:
            locks.acquire_waiting(shard, "test", 5)
        running.join(timeout=10)
    assert not running.is_alive()


def wait_for(check: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
