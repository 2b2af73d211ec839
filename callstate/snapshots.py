"""Snapshots: how a shard's log is trimmed without the log ceasing to be the truth.

A shard's snapshot has a position in its log. Every call whose entries all lie at or before
it is retired: its document is deleted and, if it published a record, a tombstone keeps the
last revision. Every call with entries on both sides is kept in the snapshot as of that
position. So the snapshot plus the log after it re-derive every call the store holds, and the
log is trimmed up to the position, never beyond what the snapshot covers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from redis.client import Pipeline
from redis.exceptions import WatchError

from callstate import streamids
from callstate.calls import (
    Doc,
    LogEntry,
    Tombstone,
    apply_batch,
    is_active,
    last_change,
    published_revision,
)
from callstate.codec import pack_doc, unpack_doc, unpack_doc_or_empty
from callstate.connection import get_many, watched_transaction
from callstate.machine import CallMachine
from callstate.retention import Retention
from callstate.store import Store

ADVANCE_BATCH = 5000
# Drainers hand a shard over at their next slice's end once it is wanted: a snapshot step
# waits that long for it.
LOCK_WAIT_SECONDS = 2.0
# What a snapshot holds, instead of a copy, for a call whose first entries were trimmed by a
# version before snapshots: the log cannot re-derive it, so a rebuild leaves it as stored.
HISTORY_TRIMMED = b"history_trimmed"


@dataclass(frozen=True)
class Snapshot:
    """A shard's snapshot: its log position (None: none taken yet), its calls (packed, or
    HISTORY_TRIMMED) and the first log id its log still held when it was read."""

    position: str | None
    docs: dict[str, bytes]
    log_from: str | None = None

    def derivable(self) -> dict[str, bytes]:
        """The calls a rebuild starts from: all but those it cannot re-derive."""
        return {c: packed for c, packed in self.docs.items() if _copy_readable(packed)}

    def underivable(self, call_id: str, first_change: str | None) -> str | None:
        """Why the log and this snapshot cannot re-derive a call, if they cannot: its copy is
        unreadable (corrupt), or its first entries were trimmed (marked so, or first changed
        before everything they cover: an upgraded deployment's)."""
        if call_id in self.docs:
            copy = self.docs[call_id]
            if copy == HISTORY_TRIMMED:
                return "history_trimmed"
            return None if _copy_readable(copy) else "snapshot_unreadable"
        covered_from = self.position or self.log_from
        if first_change is None or covered_from is None:
            return None
        first = streamids.parse(first_change)
        if self.position is not None:
            trimmed = first <= streamids.parse(self.position)
        else:
            trimmed = first < streamids.parse(covered_from)
        return "history_trimmed" if trimmed else None


@dataclass(frozen=True)
class Advanced:
    """What one step of a snapshot's advance did."""

    position: str | None
    entries: int
    retired: int
    kept: int


class Snapshots:
    """The shards' snapshots and the tombstones of retired calls."""

    def __init__(self, store: Store, machine: CallMachine, batch: int | None = None) -> None:
        self.store = store
        self.keys = store.keys
        self.machine = machine
        self.batch = batch or store.settings.drain_batch
        self.retention = Retention.of(store.settings)

    def position(self, shard: int) -> str | None:
        raw = self.store.redis.get(self.keys.snapshot_position(shard))
        return raw.decode() if isinstance(raw, bytes) else None

    def load(self, shard: int) -> Snapshot:
        pipe = self.store.redis.pipeline(transaction=True)
        pipe.get(self.keys.snapshot_position(shard))
        pipe.hgetall(self.keys.snapshot(shard))
        pipe.xrange(self.keys.log(shard), "-", "+", count=1)
        pipe.get(self.keys.cursor(shard))
        position, docs, first, cursor = pipe.execute()
        # An empty log was trimmed up to its cursor, if anything was ever applied.
        kept_from = first[0][0].decode() if first else None
        if kept_from is None and cursor:
            kept_from = streamids.following(cursor.decode())
        return Snapshot(
            position.decode() if position else None,
            {call_id.decode(): packed for call_id, packed in docs.items()},
            kept_from,
        )

    def tombstones(self, call_ids: Iterable[str]) -> dict[str, Tombstone]:
        ids = list(call_ids)
        if not ids:
            return {}
        raws = get_many(self.store.redis, [self.keys.tombstone(call_id) for call_id in ids])
        return {
            call_id: Tombstone.parse(raw) for call_id, raw in zip(ids, raws, strict=True) if raw
        }

    def docs_and_tombstones(
        self, call_ids: list[str]
    ) -> tuple[dict[str, Doc | None], dict[str, Tombstone]]:
        """The calls' documents and, for those without one, their tombstones: one round trip,
        as a drainer needs both for every batch."""
        keys = [self.keys.call(c) for c in call_ids] + [self.keys.tombstone(c) for c in call_ids]
        raws = cast(list[bytes | None], self.store.redis.mget(keys))
        docs = {c: unpack_doc(raw) if raw else None for c, raw in zip(call_ids, raws, strict=False)}
        tombstones = {
            c: Tombstone.parse(raw)
            for c, raw in zip(call_ids, raws[len(call_ids) :], strict=True)
            if raw and docs[c] is None
        }
        return docs, tombstones

    def due(self, shard: int, now_ms: int) -> bool:
        """Whether the shard's log has grown a snapshot interval older than retention."""
        first = self.store.log.first_log_id(shard)
        retention = self.retention
        return first is not None and retention.snapshot_due(streamids.millis(first), now_ms)

    def advance(self, shard: int, before_ms: int) -> Advanced | None:
        """Move the shard's snapshot over up to ADVANCE_BATCH applied entries logged before
        `before_ms`, retire the calls that ended before it, and trim the log it now covers.

        Holds the shard's drain lock, so no drainer changes a document under it; None when the
        lock is taken (the caller wakes the shard after, as for any drainer that left).
        """
        token = f"snapshot-{uuid.uuid4().hex}"
        if not self._acquire(shard, token):
            return None
        try:
            return self._advance(shard, token, before_ms)
        finally:
            self.store.coordination.locks.release(shard, token)

    def _acquire(self, shard: int, token: str) -> bool:
        return self.store.coordination.locks.acquire_waiting(shard, token, LOCK_WAIT_SECONDS)

    def _advance(self, shard: int, token: str, before_ms: int) -> Advanced:
        position, cursor = self.position(shard), self.store.log.cursor(shard)
        if cursor is None:
            return Advanced(position, 0, 0, 0)
        upto = streamids.text(min(streamids.parse(cursor), (before_ms - 1, 2**64 - 1)))
        entries = self.store.log.read_range(shard, position, upto, ADVANCE_BATCH)
        if not entries:
            return Advanced(position, 0, 0, 0)
        new_position = entries[-1].log_id
        touched = sorted({entry.call_id for entry in entries})
        live = {
            c: unpack_doc_or_empty(raw) if raw else None
            for c, raw in self.store.docs.load_packed(touched).items()
        }
        retiring = {c: doc for c, doc in live.items() if doc and _ends_by(doc, new_position)}
        kept = self._as_of(shard, [e for e in entries if e.call_id not in retiring], live)
        for call_id, doc in list(kept.items()):
            if isinstance(doc, dict) and live[call_id] is None and _ends_by(doc, new_position):
                retiring[call_id] = doc
                del kept[call_id]
        if not self._commit(shard, token, position, cursor, new_position, retiring, kept):
            return Advanced(position, 0, 0, 0)
        return Advanced(new_position, len(entries), len(retiring), len(kept))

    def _as_of(
        self, shard: int, entries: list[LogEntry], live: dict[str, Doc | None]
    ) -> dict[str, Doc | bytes | None]:
        """The documents of the entries' calls as of the last entry: the snapshot's copy, with
        the entries applied as a drainer applied them; HISTORY_TRIMMED for a call the log
        cannot re-derive."""
        call_ids = sorted({entry.call_id for entry in entries})
        if not call_ids:
            return {}
        copies = self.store.redis.hmget(self.keys.snapshot(shard), call_ids)
        packed = dict(zip(call_ids, cast(list[bytes | None], copies), strict=True))
        tombstones = self.tombstones(c for c in call_ids if not packed[c])
        first_seen: dict[str, str] = {}
        for entry in entries:
            first_seen.setdefault(entry.call_id, entry.log_id)
        trimmed = {
            c
            for c in call_ids
            if ((copy := packed[c]) is not None and not _copy_readable(copy))
            or (not packed[c] and c not in tombstones and _began_before(live[c], first_seen[c]))
        }
        derivable = [c for c in call_ids if c not in trimmed]

        def load() -> dict[str, Doc | None]:
            return {c: unpack_doc(cast(bytes, packed[c])) if packed[c] else None for c in derivable}

        docs = load()
        limits = self.store.settings.call_limits
        ours = [entry for entry in entries if entry.call_id not in trimmed]
        applied = apply_batch(docs, load, ours, self.machine, limits, tombstones)
        found: dict[str, Doc | bytes | None] = {c: HISTORY_TRIMMED for c in trimmed}
        return found | docs | applied.docs

    def _commit(
        self,
        shard: int,
        token: str,
        position: str | None,
        cursor: str,
        new_position: str,
        retiring: dict[str, Doc],
        kept: dict[str, Doc | bytes | None],
    ) -> bool:
        """Write the snapshot's step, retire calls and trim the log in one transaction, fenced
        like a drainer's commit: only while the shard's lock holds `token` and neither the
        cursor nor the snapshot moved."""
        keys = (
            self.keys.cursor(shard),
            self.keys.snapshot_position(shard),
            self.keys.drain_lock(shard),
        )
        expected = [cursor.encode(), position.encode() if position else None, token.encode()]
        with watched_transaction(self.store.redis, keys[0]) as pipe:
            try:
                pipe.watch(*keys)  # type: ignore[no-untyped-call]
                if pipe.mget(*keys) != expected:
                    return False
                pipe.multi()
                for doc in retiring.values():
                    self._retire(pipe, shard, doc)
                for call_id, maybe in kept.items():
                    if maybe is None:
                        pipe.hdel(self.keys.snapshot(shard), call_id)
                    else:
                        stored = maybe if isinstance(maybe, bytes) else pack_doc(maybe)
                        pipe.hset(self.keys.snapshot(shard), call_id, stored)
                pipe.set(keys[1], new_position)
                pipe.xtrim(
                    self.keys.log(shard), minid=streamids.following(new_position), approximate=False
                )
                pipe.execute()
                return True
            except WatchError:
                return False

    def _retire(self, pipe: Pipeline, shard: int, doc: Doc) -> None:
        call_id = doc["call_id"]
        pipe.delete(self.keys.call(call_id))
        pipe.hdel(self.keys.snapshot(shard), call_id)
        if doc["record"] is None:
            return
        retention = self.retention
        last_ms = streamids.millis(_last_change(doc))
        tombstone = Tombstone(published_revision(doc), retention.refused_until(last_ms))
        pipe.set(
            self.keys.tombstone(call_id),
            tombstone.text(),
            pxat=retention.tombstone_expires(last_ms),
        )


def _ends_by(doc: Doc, position: str) -> bool:
    """A call that is not active and whose last change is at or before `position` (an
    unreadable document is never retired: it is left for an operator)."""
    if not isinstance(doc.get("journal"), list) or last_change(doc) is None:
        return False
    return not is_active(doc) and streamids.parse(_last_change(doc)) <= streamids.parse(position)


def _began_before(doc: Doc | None, log_id: str) -> bool:
    """Whether a stored call was first changed before `log_id`, the first of its entries the
    log still holds: its earlier entries were trimmed."""
    if doc is None or not isinstance(doc.get("journal"), list) or not doc["journal"]:
        return False
    return streamids.parse(doc["journal"][0]["log_id"]) < streamids.parse(log_id)


def _last_change(doc: Doc) -> str:
    found = last_change(doc)
    assert found is not None, doc["call_id"]
    return found


def _copy_readable(copy: bytes) -> bool:
    return copy != HISTORY_TRIMMED and bool(unpack_doc_or_empty(copy))
