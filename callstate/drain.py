"""Draining a shard's event log into call state: one drainer per shard at a time, in log order."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from callstate.calls import Applied, LogEntry, apply_batch
from callstate.machine import CallMachine
from callstate.snapshots import Snapshots
from callstate.store import Store

log = logging.getLogger(__name__)


class Drainer:
    """Applies a shard's new log entries in batches, each committed atomically with its cursor.

    A drain job keeps its shard for up to `slice_ms`, waiting up to `linger_ms` for more entries,
    so a steady stream of events costs one RQ job per slice instead of one per event; when the
    slice runs out the job wakes a successor, so other shards get the worker in turn. After a
    partial batch it waits `window_ms` so the next transaction carries several events.

    With `shards_per_job`, a job also takes shards nobody holds, up to that many, and waits on
    each in a thread of its own (one `XREAD BLOCK` per shard, never one across shards): with
    fewer workers than shards, every shard still has a reader waiting on it, so an event is
    applied as it arrives instead of after another shard's slice and a new job's start.

    No lost wake-up, and at most one queued job per shard: a job clears the shard's wake flag as
    it starts, so every event logged after that start claims the flag and queues a job, or finds
    it claimed by a queued job that has not started yet. A job that finds a shard locked leaves
    it: the holder looks at the log again after it lets go.
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
    ) -> None:
        self.store = store
        self.batch = batch
        self.slice_seconds = slice_ms / 1000
        self.linger_ms = linger_ms
        self.window_seconds = window_ms / 1000
        self.wake = wake
        # Called after a commit that published records: wakes the shard's forwarder.
        self.on_records = on_records
        self.shards_per_job = shards_per_job
        # The state machine is loaded with one call at a time: each thread has its own.
        self._own = threading.local()
        self._own.machine, self._own.snapshots = machine, Snapshots(store, machine)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def snapshots(self) -> Snapshots:
        """This thread's snapshot reader, over this thread's state machine."""
        if not hasattr(self._own, "snapshots"):
            self._own.machine = CallMachine()
            self._own.snapshots = Snapshots(self.store, self._own.machine)
        snapshots: Snapshots = self._own.snapshots
        return snapshots

    def drain(self, shard: int, wake_id: str | None = None) -> int:
        """Apply what the job's shards log until they are quiet or the slice ends; return how
        many. `wake_id` is this job's id, which the shard's wake flag holds while it is queued."""
        if wake_id is not None:
            self.store.coordination.wakes.clear(shard, wake_id)
        held = self._take_shards(shard)
        if not held:
            # The holders look at the log again after they let go, so nothing is left behind.
            return 0
        others: list[Future[int]] = [
            self._threads().submit(self._drain_held, *taken) for taken in held[1:]
        ]
        try:
            applied = self._drain_held(*held[0])
        finally:
            # Every thread ends within its slice; the first failure fails the job.
            applied_elsewhere = [future.result() for future in others]
        return applied + sum(applied_elsewhere)

    def _take_shards(self, shard: int) -> list[tuple[int, str]]:
        """Lock the job's own shard if free and, with `shards_per_job`, free ones after it, up
        to that many in all."""
        if self.shards_per_job is None:
            wanted, candidates = 1, [shard]
        else:
            shards = self.store.settings.shards
            wanted = self.shards_per_job()
            candidates = [(shard + step) % shards for step in range(shards)]
        held: list[tuple[int, str]] = []
        for candidate in candidates:
            if len(held) >= wanted:
                break
            token = uuid.uuid4().hex
            if self.store.coordination.locks.acquire(candidate, token):
                held.append((candidate, token))
        return held

    def _threads(self) -> ThreadPoolExecutor:
        """One thread per shard a job takes beyond its first, started when first needed."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.store.settings.shards, thread_name_prefix="drain")
        return self._pool

    def _drain_held(self, shard: int, token: str) -> int:
        """Drain a shard this job has locked, slice after slice while the log has a backlog;
        hand it to a successor job if the slice ended while events kept coming."""
        applied = 0
        while True:
            try:
                count, quiet = self._drain_slice(shard, token)
                applied += count
            finally:
                self.store.coordination.locks.release(shard, token)
            if not quiet:
                self.wake(shard)
                return applied
            if not self.store.log.has_backlog(shard):
                return applied
            token = uuid.uuid4().hex
            if not self.store.coordination.locks.acquire(shard, token):
                return applied

    def _drain_slice(self, shard: int, token: str) -> tuple[int, bool]:
        """Apply entries until the log stays quiet; the flag says whether it did before the end."""
        deadline = time.monotonic() + self.slice_seconds
        applied = 0
        cursor = self.store.log.cursor(shard)
        while True:
            entries = self.store.log.read_entries(shard, cursor, self.batch)
            if entries:
                if not self._commit(shard, token, cursor, entries):
                    return applied, True
                cursor = entries[-1].log_id
                applied += len(entries)
                if time.monotonic() >= deadline:
                    return applied, False
                if len(entries) < self.batch:
                    self._gather(deadline)
                continue
            # A job that holds one shard of several leaves it once idle: lingering there would
            # only keep the worker from the others. A job that covers shards waits on each.
            linger_ms = self.linger_ms if applied or self.shards_per_job is not None else 0
            wait_ms = min(linger_ms, int((deadline - time.monotonic()) * 1000))
            if wait_ms > 0 and self.store.log.read_entries(shard, cursor, 1, block_ms=wait_ms):
                self._gather(deadline)
                continue
            return applied, True

    def _gather(self, deadline: float) -> None:
        """Let a batch build up: one transaction for the events of the next few milliseconds,
        instead of one per event, for at most `window_ms` of extra lag."""
        time.sleep(max(0.0, min(self.window_seconds, deadline - time.monotonic())))

    def _commit(self, shard: int, token: str, cursor: str | None, entries: list[LogEntry]) -> bool:
        call_ids = sorted({entry.call_id for entry in entries})
        docs, tombstones = self.snapshots.docs_and_tombstones(call_ids)
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
