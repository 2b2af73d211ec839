"""Draining a shard's event log into call state: one drainer per shard at a time, in log order."""

from __future__ import annotations

import logging
import uuid

from callstate.calls import apply_entries
from callstate.machine import CallMachine
from callstate.store import Store

log = logging.getLogger(__name__)


class Drainer:
    """Applies a shard's new log entries in batches, each committed atomically with its cursor."""

    def __init__(self, store: Store, machine: CallMachine, batch: int) -> None:
        self.store = store
        self.machine = machine
        self.batch = batch

    def drain(self, shard: int) -> int:
        """Apply everything logged in the shard so far; return how many entries it applied."""
        # Cleared before taking the lock: an event logged from now on wakes another drain job,
        # and a drain job that finds the lock taken leaves its events to the holder's re-check.
        self.store.clear_drain_pending(shard)
        applied = 0
        while True:
            token = uuid.uuid4().hex
            if not self.store.acquire_drain_lock(shard, token):
                return applied
            try:
                applied += self._drain_locked(shard, token)
            finally:
                self.store.release_drain_lock(shard, token)
            if not self.store.has_backlog(shard):
                return applied

    def _drain_locked(self, shard: int, token: str) -> int:
        applied = 0
        cursor = self.store.cursor(shard)
        while entries := self.store.read_entries(shard, cursor, self.batch):
            docs = self.store.load_docs({entry.call_id for entry in entries})
            indexed_before = {call_id: self.store.index_keys(doc) for call_id, doc in docs.items()}
            changed, records = apply_entries(docs, entries, self.machine)
            new_cursor = entries[-1].log_id
            changed_docs = {c: doc for c in changed if (doc := docs[c]) is not None}
            if not self.store.commit(
                shard, cursor, new_cursor, len(entries), changed_docs, indexed_before, records
            ):
                log.warning("shard %s: cursor moved under this drainer; stopping", shard)
                return applied
            cursor = new_cursor
            applied += len(entries)
            if not self.store.extend_drain_lock(shard, token):
                return applied
        return applied
