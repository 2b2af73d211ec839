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
from callstate.calls import Doc, LogEntry, Tombstone, apply_batch, is_active, last_change
from callstate.codec import pack_doc, unpack_doc
from callstate.machine import CallMachine
from callstate.store import Store

ADVANCE_BATCH = 5000


@dataclass(frozen=True)
class Snapshot:
    """A shard's snapshot: its log position (None: the log's start) and its calls, packed."""

    position: str | None
    docs: dict[str, bytes]


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

    def position(self, shard: int) -> str | None:
        raw = self.store.redis.get(self.keys.snapshot_position(shard))
        return raw.decode() if isinstance(raw, bytes) else None

    def load(self, shard: int) -> Snapshot:
        pipe = self.store.redis.pipeline(transaction=True)
        pipe.get(self.keys.snapshot_position(shard))
        pipe.hgetall(self.keys.snapshot(shard))
        position, docs = pipe.execute()
        return Snapshot(
            position.decode() if position else None,
            {call_id.decode(): packed for call_id, packed in docs.items()},
        )

    def tombstones(self, call_ids: Iterable[str]) -> dict[str, Tombstone]:
        ids = list(call_ids)
        if not ids:
            return {}
        raws = self.store.redis.mget([self.keys.tombstone(call_id) for call_id in ids])
        return {
            call_id: _tombstone(cast(bytes, raw))
            for call_id, raw in zip(ids, raws, strict=True)
            if raw
        }

    def due(self, shard: int, before_ms: int, interval_ms: int) -> bool:
        """Whether the shard's log holds entries older than `before_ms` by more than
        `interval_ms` that no snapshot covers yet."""
        first = self.store.log.first_log_id(shard)
        return first is not None and streamids.millis(first) < before_ms - interval_ms

    def advance(self, shard: int, before_ms: int) -> Advanced | None:
        """Move the shard's snapshot over up to ADVANCE_BATCH applied entries logged before
        `before_ms`, retire the calls that ended before it, and trim the log it now covers.

        Holds the shard's drain lock, so no drainer changes a document under it; None when the
        lock is taken (the caller wakes the shard after, as for any drainer that left).
        """
        token = f"snapshot-{uuid.uuid4().hex}"
        if not self.store.coordination.acquire_drain_lock(shard, token):
            return None
        try:
            return self._advance(shard, before_ms)
        finally:
            self.store.coordination.release_drain_lock(shard, token)

    def _advance(self, shard: int, before_ms: int) -> Advanced:
        position, cursor = self.position(shard), self.store.log.cursor(shard)
        if cursor is None:
            return Advanced(position, 0, 0, 0)
        upto = streamids.text(min(streamids.parse(cursor), (before_ms - 1, 2**64 - 1)))
        entries = self.store.log.read_range(shard, position, upto, ADVANCE_BATCH)
        if not entries:
            return Advanced(position, 0, 0, 0)
        new_position = entries[-1].log_id
        touched = sorted({entry.call_id for entry in entries})
        live = self.store.docs.load_docs(touched)
        retiring = {c: doc for c, doc in live.items() if doc and _ends_by(doc, new_position)}
        kept = self._as_of(shard, [e for e in entries if e.call_id not in retiring])
        for call_id, doc in list(kept.items()):
            if doc is not None and live[call_id] is None and _ends_by(doc, new_position):
                retiring[call_id] = doc
                del kept[call_id]
        if not self._commit(shard, position, cursor, new_position, retiring, kept):
            return Advanced(position, 0, 0, 0)
        return Advanced(new_position, len(entries), len(retiring), len(kept))

    def _as_of(self, shard: int, entries: list[LogEntry]) -> dict[str, Doc | None]:
        """The documents of the entries' calls as of the last entry: the snapshot's copy, with
        the entries applied as a drainer applied them."""
        call_ids = sorted({entry.call_id for entry in entries})
        if not call_ids:
            return {}
        packed = self.store.redis.hmget(self.keys.snapshot(shard), call_ids)

        def load() -> dict[str, Doc | None]:
            return {
                c: unpack_doc(cast(bytes, raw)) if raw else None
                for c, raw in zip(call_ids, packed, strict=True)
            }

        docs = load()
        tombstones = self.tombstones(c for c, doc in docs.items() if doc is None)
        limits = self.store.settings.call_limits
        applied = apply_batch(docs, load, entries, self.machine, limits, tombstones)
        return docs | applied.docs

    def _commit(
        self,
        shard: int,
        position: str | None,
        cursor: str,
        new_position: str,
        retiring: dict[str, Doc],
        kept: dict[str, Doc | None],
    ) -> bool:
        """Write the snapshot's step, retire calls and trim the log in one transaction, fenced
        like a drainer's commit; it also rewrites the cursor, so a drainer that lost its lock
        and read a document retired here cannot commit over it."""
        keys = (self.keys.cursor(shard), self.keys.snapshot_position(shard))
        with self.store.redis.pipeline() as pipe:
            try:
                pipe.watch(*keys)  # type: ignore[no-untyped-call]
                if pipe.get(keys[0]) != cursor.encode() or self.position(shard) != position:
                    return False
                pipe.multi()
                for doc in retiring.values():
                    self._retire(pipe, shard, doc)
                for call_id, maybe in kept.items():
                    if maybe is None:
                        pipe.hdel(self.keys.snapshot(shard), call_id)
                    else:
                        pipe.hset(self.keys.snapshot(shard), call_id, pack_doc(maybe))
                pipe.set(keys[1], new_position)
                pipe.set(keys[0], cursor)
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
        retention_ms = self.store.settings.retention_seconds * 1000
        until_ms = streamids.millis(_last_change(doc)) + 2 * retention_ms
        # Kept one more retention past `until_ms`: as long as the log may hold an entry
        # logged before it, which must be refused by a rebuild as it was live.
        pipe.set(
            self.keys.tombstone(call_id),
            f"{doc['record']['revision']}:{until_ms}",
            pxat=until_ms + retention_ms,
        )


def _ends_by(doc: Doc, position: str) -> bool:
    """A call that is not active and whose last change is at or before `position`."""
    return not is_active(doc) and streamids.parse(_last_change(doc)) <= streamids.parse(position)


def _last_change(doc: Doc) -> str:
    found = last_change(doc)
    assert found is not None, doc["call_id"]
    return found


def _tombstone(raw: bytes) -> Tombstone:
    revision, _, until_ms = raw.decode().partition(":")
    return Tombstone(int(revision), int(until_ms))
