"""Draining a shard's event log into call state: one drainer per shard at a time, in log order."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

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

    No lost wake-up, and at most one queued job per shard: a job clears the shard's wake flag as
    it starts, so every event logged after that start claims the flag and queues a job, or finds
    it claimed by a queued job that has not started yet. A job that finds the shard locked leaves:
    the holder looks at the log again after it lets go.
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
    ) -> None:
        self.store = store
        self.machine = machine
        self.snapshots = Snapshots(store, machine)
        self.batch = batch
        self.slice_seconds = slice_ms / 1000
        self.linger_ms = linger_ms
        self.window_seconds = window_ms / 1000
        self.wake = wake
        # Called after a commit that published records: wakes the shard's forwarder.
        self.on_records = on_records

    def drain(self, shard: int, wake_id: str | None = None) -> int:
        """Apply what the shard logs until it is quiet or the slice ends; return how many.
        `wake_id` is this job's id, which the wake flag holds while the job is queued."""
        if wake_id is not None:
            self.store.coordination.wakes.clear(shard, wake_id)
        applied = 0
        while True:
            token = uuid.uuid4().hex
            if not self.store.coordination.locks.acquire(shard, token):
                # The holder looks at the log again after it lets go, so nothing is left behind.
                return applied
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
            # A shard that had nothing for this job is idle: lingering there would only keep
            # the worker from other shards.
            linger_ms = self.linger_ms if applied else 0
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
            self.machine,
            self.store.settings.call_limits,
            tombstones,
        )
        committed = self.store.docs.commit(
            shard, token, cursor, entries[-1].log_id, len(entries), applied, prior
        )
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
