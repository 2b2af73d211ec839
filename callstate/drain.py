"""Draining a shard's event log into call state: one drainer per shard at a time, in log order."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from redis.exceptions import RedisError

from callstate.calls import Applied, Doc, LogEntry, Tombstone, apply_batch
from callstate.codec import unpack_doc
from callstate.coordination import new_wake_id
from callstate.machine import CallMachine
from callstate.snapshots import Snapshots
from callstate.store import Store

log = logging.getLogger(__name__)
# Documents a hold keeps as it wrote them (a few MB at most), instead of reading them back.
WRITTEN_KEPT = 10_000


class Drainer:
    """Applies a shard's new log entries in batches, each committed atomically with its cursor.

    A drain job holds its shard while events keep coming: it waits up to `linger_ms` for more
    (`XREAD BLOCK`), so a steady stream costs one RQ job, not one per event; after a partial
    batch it waits `window_ms` so the next transaction carries several events. Every `slice_ms`
    it hands the shard to a successor job if another job has waited a whole slice for a worker
    (`others_waiting`), a waiter wants the lock, or its worker is `stopping`; and after
    `drain_lock_seconds` in any case, well within RQ's job timeout.

    With `shards_per_job`, a job also takes shards nobody holds, up to that many, and waits on
    each in a thread of its own (one `XREAD BLOCK` per shard, never one across shards): with
    fewer workers than shards, every shard still has a reader waiting on it, so an event is
    applied as it arrives, not after another shard's slice and a new job's start. When more
    workers run than when it started, the job hands the shards beyond its new share over at
    their slices' end, so workers that start under load get shards within a slice.

    No lost wake-up, and at most one queued job per shard: the shard's wake flag names the job
    that is queued for it or holds it, so an event logged meanwhile queues nothing. The job lets
    go of the lock, then of the flag, then looks at the log once more and wakes a successor for
    anything logged since its last read. A job that cannot take its own shard passes its flag
    to the drain job that holds it, or lets go of it: the holder looks again after it lets go.
    """

    def __init__(
        self,
        store: Store,
        machine: CallMachine,
        batch: int,
        slice_ms: int,
        linger_ms: int,
        window_ms: int,
        wake: Callable[[int], object],
        on_records: Callable[[int], object] | None = None,
        shards_per_job: Callable[[], int] | None = None,
        others_waiting: Callable[[], bool] | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.batch = batch
        self.slice_seconds = slice_ms / 1000
        self.linger_seconds = linger_ms / 1000
        self.window_seconds = window_ms / 1000
        self.wake = wake
        # Called after a commit that published records: wakes the shard's forwarder.
        self.on_records = on_records
        self.shards_per_job = shards_per_job
        self.others_waiting = others_waiting
        self.stopping = stopping
        self.longest_hold_seconds = store.settings.drain_lock_seconds
        # The state machine is loaded with one call at a time: each thread has its own.
        self._own = threading.local()
        self._own.machine, self._own.snapshots = machine, Snapshots(store, machine)
        self._pool: ThreadPoolExecutor | None = None
        # The shards the running job holds (a worker runs one job at a time), for its share.
        self._held: set[int] = set()
        self._own_held: int | None = None
        self._held_lock = threading.Lock()

    @property
    def snapshots(self) -> Snapshots:
        """This thread's snapshot reader, over this thread's state machine."""
        if not hasattr(self._own, "snapshots"):
            self._own.machine = CallMachine()
            self._own.snapshots = Snapshots(self.store, self._own.machine)
        snapshots: Snapshots = self._own.snapshots
        return snapshots

    def drain(self, shard: int, wake_id: str | None = None) -> int:
        """Apply what the job's shards log until they are quiet or handed over; return how
        many. `wake_id` is this job's id, which the shard's wake flag holds while it is queued."""
        job = wake_id or new_wake_id()
        held: list[int] = []
        try:
            held = self._take_shards(shard, job)
        finally:
            if wake_id is not None and shard not in held:
                self._leave_untaken(shard, wake_id)
        if not held:
            return 0
        with self._held_lock:
            self._held, self._own_held = set(held), held[0]
        until = time.monotonic() + self.longest_hold_seconds
        others: list[Future[int]] = [
            self._threads().submit(self._drain_held, taken, job, until) for taken in held[1:]
        ]
        try:
            applied = self._drain_held(held[0], job, until)
        finally:
            # Every thread ends by `until`; the job ends after all of them, failed by the first
            # failure.
            wait(others)
        return applied + sum(future.result() for future in others)

    def _leave_untaken(self, shard: int, wake_id: str) -> None:
        """The job could not take its own shard: its flag passes to the drain job holding it,
        which looks at the log after it lets go. If the holder let go meanwhile, its last look
        may have found the flag naming this job: this job looks instead."""
        if self.store.coordination.leave_flag(shard, wake_id) and self.store.log.has_backlog(shard):
            self.wake(shard)

    def _take_shards(self, shard: int, job: str) -> list[int]:
        """Lock the job's own shard if free and, with `shards_per_job`, free ones after it, up
        to that many in all; hold the wake flag of each one whose flag no queued job holds."""
        if self.shards_per_job is None:
            wanted, candidates = 1, [shard]
        else:
            shards = self.store.settings.shards
            wanted = self.shards_per_job()
            candidates = [(shard + step) % shards for step in range(shards)]
        coordination = self.store.coordination
        held: list[int] = []
        for candidate in candidates:
            if len(held) >= wanted:
                break
            if coordination.locks.acquire_unless_wanted(candidate, job):
                coordination.wakes.hold(candidate, job)
                held.append(candidate)
        return held

    def _threads(self) -> ThreadPoolExecutor:
        """One thread per shard a job takes beyond its first, started when first needed."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.store.settings.shards, thread_name_prefix="drain")
        return self._pool

    def _drain_held(self, shard: int, job: str, until: float) -> int:
        """Drain a shard this job has locked, then let go of it, and wake a successor if
        events kept coming or came after the last read."""
        coordination = self.store.coordination
        try:
            applied, quiet = self._drain_while_held(shard, job, until)
        except BaseException:
            # The flag stays: events logged meanwhile queued nothing, and maintenance wakes
            # the shard once the flag's job is neither queued nor holding it (as after a
            # crash), rather than at once into the same failure.
            with contextlib.suppress(RedisError):
                coordination.locks.release(shard, job)
            raise
        finally:
            self._forget_held(shard)
        coordination.locks.release(shard, job)
        coordination.wakes.clear(shard, job)
        if not quiet or self.store.log.has_backlog(shard):
            self.wake(shard)
        return applied

    def _drain_while_held(self, shard: int, job: str, until: float) -> tuple[int, bool]:
        """Apply entries until the log stays quiet for the linger (True) or the shard is to be
        handed over while events keep coming (False)."""
        applied = in_slice = 0
        waited = False
        cursor = self.store.log.cursor(shard)
        # What this hold committed: while the lock holds, nobody else writes these documents.
        written: dict[str, bytes] = {}
        now = time.monotonic()
        slice_ends, quiet_at = now + self.slice_seconds, now + self._first_linger()
        while True:
            entries = self._next_batch(shard, cursor, min(quiet_at, slice_ends))
            if entries:
                if not self._commit(shard, job, cursor, entries, written):
                    return applied, True
                cursor = entries[-1].log_id
                applied += len(entries)
                in_slice += len(entries)
                quiet_at = time.monotonic() + self.linger_seconds
            elif time.monotonic() >= quiet_at:
                return applied, True
            if time.monotonic() >= slice_ends:
                # A job queued for a worker that is idle is taken at once: one still queued
                # a slice later has no worker but this one's.
                waiting = self.others_waiting is not None and self.others_waiting()
                if (
                    (waiting and waited)
                    or self._beyond_share(shard)
                    or not self._keep(shard, job, until)
                ):
                    return applied, not in_slice
                slice_ends, in_slice, waited = time.monotonic() + self.slice_seconds, 0, waiting

    def _next_batch(self, shard: int, cursor: str | None, wait_until: float) -> list[LogEntry]:
        """Up to a batch of entries after `cursor`, waiting until `wait_until` for the first (one
        blocking read returns at once what is there). With a window, a partial batch is read
        again after it, so one transaction carries what arrived meanwhile."""
        wait_ms = int((wait_until - time.monotonic()) * 1000)
        entries = self.store.log.read_entries(shard, cursor, self.batch, max(0, wait_ms))
        if entries and len(entries) < self.batch and self.window_seconds:
            time.sleep(self.window_seconds)
            entries = self.store.log.read_entries(shard, cursor, self.batch)
        return entries

    def _first_linger(self) -> float:
        """How long a shard may stay quiet before the job applied anything there (after, the
        linger). A job of one shard among several leaves an idle shard at once: waiting there
        would keep the worker from the others."""
        return self.linger_seconds if self.shards_per_job is not None else 0.0

    def _beyond_share(self, shard: int) -> bool:
        """At a slice's end: whether this shard, not the job's own, is one more than the job's
        share now that more workers run (they started after it, under load); if so, it is no
        longer counted as held, so threads deciding at once do not all let go (one leaving for
        another reason counts until it is gone, so the job may end one short of its share)."""
        if self.shards_per_job is None or shard == self._own_held:
            return False
        share = self.shards_per_job()
        with self._held_lock:
            if len(self._held) <= share:
                return False
            self._held.discard(shard)
            return True

    def _forget_held(self, shard: int) -> None:
        with self._held_lock:
            self._held.discard(shard)

    def _keep(self, shard: int, job: str, until: float) -> bool:
        """At a slice's end: go on holding the shard unless its worker is stopping, a snapshot
        step, trim or rebuild wants it, or the hold has lasted its longest; renewing the lock,
        which a quiet slice did not. A drainer without `others_waiting` never goes on."""
        if self.others_waiting is None or self.stopping() or time.monotonic() >= until:
            return False
        if self.store.coordination.locks.is_wanted(shard):
            return False
        return self.store.coordination.locks.renew(shard, job)

    def _commit(
        self,
        shard: int,
        token: str,
        cursor: str | None,
        entries: list[LogEntry],
        written: dict[str, bytes],
    ) -> bool:
        call_ids = sorted({entry.call_id for entry in entries})
        docs, tombstones = self._docs_and_tombstones(call_ids, written)
        prior = {call_id: self.store.docs.prior(doc) for call_id, doc in docs.items()}
        applied = apply_batch(
            docs,
            lambda: self.store.docs.load_docs(call_ids),
            entries,
            self.snapshots.machine,
            self.store.settings.call_limits,
            tombstones,
        )
        log_ids = [entry.log_id for entry in entries]
        committed = self.store.docs.commit(shard, token, cursor, log_ids, applied, prior)
        if not committed:
            log.warning(
                "shard %s: lock lost or cursor moved under this drainer; stopping",
                shard,
                extra={"shard": shard},
            )
        else:
            self._remember(written, applied)
            if applied.records and self.on_records is not None:
                self.on_records(shard)
            if applied.unprocessable:
                self._report_unprocessable(shard, applied)
            if applied.expired:
                log.info(
                    "shard %s: %d events refused, their calls were retired (rejected: expired)",
                    shard,
                    len(applied.expired),
                    extra={"shard": shard},
                )
        return committed

    def _docs_and_tombstones(
        self, call_ids: list[str], written: dict[str, bytes]
    ) -> tuple[dict[str, Doc | None], dict[str, Tombstone]]:
        """The calls' documents: those this hold wrote as it wrote them (a round trip saved per
        batch of calls already seen), the others with their tombstones from Redis."""
        unknown = [call_id for call_id in call_ids if call_id not in written]
        docs, tombstones = self.snapshots.docs_and_tombstones(unknown) if unknown else ({}, {})
        known = {
            call_id: unpack_doc(written[call_id]) for call_id in call_ids if call_id in written
        }
        return {**docs, **known}, tombstones

    def _remember(self, written: dict[str, bytes], applied: Applied) -> None:
        """Keep what a commit wrote, as stored; forget it all past WRITTEN_KEPT calls."""
        if len(written) + len(applied.packed) > WRITTEN_KEPT:
            written.clear()
        written.update(applied.packed)

    def _report_unprocessable(self, shard: int, applied: Applied) -> None:
        """Log and quarantine what was set aside: ids and error classes, never payload text."""
        received_ms = self.store.log.server_time_ms()
        for item in applied.unprocessable:
            log.error(
                "shard %s: log entry %s (call %s) could not be applied (%s); set aside",
                shard,
                item.log_id,
                item.call_id or "unreadable",
                item.error,
                extra={"shard": shard, "log_id": item.log_id, "call_id": item.call_id},
            )
            self.store.quarantine.add(
                {
                    "received_ms": received_ms,
                    "status": None,
                    "error": "unprocessable",
                    "field": None,
                    "message": f"applying the logged entry raised {item.error}",
                    "log_id": item.log_id,
                    "shard": shard,
                    "call_id": item.call_id,
                }
            )
