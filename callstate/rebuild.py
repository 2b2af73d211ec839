"""Re-deriving every call from its shard's snapshot and the log after it, the source of truth.

`check` compares each shard at its committed cursor, on a live system: a document read while a
drainer moved on is read again, never reported. `rebuild` holds every shard's drain lock for
its whole run (renewed), derives each shard at its cursor, and rewrites only what differs, in
one transaction fenced on the cursors. It never removes or degrades a call the store holds:
what the log cannot re-derive is left as it is, with the reason.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from callstate import streamids
from callstate.calls import Doc, LogEntry, apply_batch, is_active, last_change, published_revision
from callstate.codec import unpack_doc, unpack_doc_or_empty
from callstate.figures import count_logged_anew
from callstate.machine import CallMachine
from callstate.snapshots import Snapshot, Snapshots
from callstate.store import Store

log = logging.getLogger(__name__)
SETTLE_ROUNDS = 20
SNAPSHOT_MOVES = 5
COMPARE_CHUNK = 1000
NOT_IN_LOG = "not_in_log"
HISTORY_TRIMMED = "history_trimmed"
# A stored record already published a higher revision than the log now derives (after a change
# of the record's rules): rewriting it would publish a number twice.
NEWER_REVISION = "newer_revision"
LEFT = frozenset({NOT_IN_LOG, HISTORY_TRIMMED, NEWER_REVISION, "snapshot_unreadable"})


# Drain jobs hand a wanted shard over at their next slice's end; a snapshot step or a trim may
# hold it for a few seconds.
LOCK_WAIT_SECONDS = 10.0


@dataclass
class Report:
    """What a check found: calls compared, calls differing, calls left as stored and why."""

    compared: int = 0
    differing: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    rewritten: int = 0


@dataclass
class ShardState:
    """One shard's calls as derived (packed) and as stored, and the log position derived to."""

    derived: dict[str, bytes]
    position: str | None
    snapshot: Snapshot


def derive_shard(
    snapshots: Snapshots, shard: int, snapshot: Snapshot, upto: str | None
) -> dict[str, bytes]:
    """The shard's calls as the snapshot and its log up to `upto` imply, in stored form."""
    return extend(snapshots, shard, snapshot.derivable(), snapshot.position, upto)


def extend(
    snapshots: Snapshots,
    shard: int,
    packed: dict[str, bytes],
    after: str | None,
    upto: str | None,
) -> dict[str, bytes]:
    """Apply the shard's entries after `after` up to `upto` to `packed`, as drainers did, in
    batches of `snapshots.batch` (verdicts never depend on batch boundaries)."""
    if upto is None or (after is not None and streamids.parse(upto) <= streamids.parse(after)):
        return packed
    for entries in snapshots.store.log.iter_log(shard, snapshots.batch, after, upto):
        packed.update(_apply_stored(snapshots, packed, entries))
    return packed


def _apply_stored(
    snapshots: Snapshots, packed: dict[str, bytes], entries: list[LogEntry]
) -> dict[str, bytes]:
    call_ids = {entry.call_id for entry in entries}

    def load() -> dict[str, Doc | None]:
        return {c: unpack_doc(packed[c]) if c in packed else None for c in call_ids}

    tombstones = snapshots.tombstones(c for c in call_ids if c not in packed)
    limits = snapshots.store.settings.call_limits
    applied = apply_batch(load(), load, entries, snapshots.machine, limits, tombstones)
    return applied.packed


def check(store: Store, machine: CallMachine, batch: int | None = None) -> Report:
    """Compare every stored call with what its shard's snapshot and log imply, shard by shard,
    each at its committed cursor; safe on a live system."""
    snapshots = Snapshots(store, machine, batch)
    report = Report()
    stored_ids = _ids_by_shard(store)
    for shard in range(store.settings.shards):
        _check_shard(store, snapshots, shard, stored_ids.get(shard, set()), report)
    return report


def _check_shard(
    store: Store, snapshots: Snapshots, shard: int, stored_ids: set[str], report: Report
) -> None:
    for _ in range(SNAPSHOT_MOVES):
        snapshot = snapshots.load(shard)
        cursor = store.log.cursor(shard)
        state = ShardState(derive_shard(snapshots, shard, snapshot, cursor), cursor, snapshot)
        found = Report()
        _settle(store, snapshots, shard, state, stored_ids | state.derived.keys(), found)
        # A snapshot that moved meanwhile retired calls this derivation still holds: again.
        if snapshots.position(shard) == snapshot.position:
            report.compared += found.compared
            report.differing += found.differing
            report.left |= found.left
            return
    raise RuntimeError(f"shard {shard}: its snapshot kept moving during the check; run it again")


def _settle(
    store: Store,
    snapshots: Snapshots,
    shard: int,
    state: ShardState,
    call_ids: set[str],
    report: Report,
) -> None:
    """Compare each call at the position of its stored document, a chunk at a time: a document
    that changed between the two reads is read again, with the derivation carried on."""
    report.compared += len(call_ids)
    unsettled = sorted(call_ids)
    for _ in range(SETTLE_ROUNDS):
        unsettled = [
            call_id
            for chunk in _chunks(unsettled, COMPARE_CHUNK)
            for call_id in _settle_chunk(store, snapshots, shard, state, chunk, report)
        ]
        if not unsettled:
            return
    report.differing += unsettled


def _settle_chunk(
    store: Store,
    snapshots: Snapshots,
    shard: int,
    state: ShardState,
    call_ids: list[str],
    report: Report,
) -> list[str]:
    """Compare a chunk of calls; return those to read again."""
    before = store.log.cursor(shard)
    stored = store.docs.load_packed(call_ids)
    after = store.log.cursor(shard)
    extend(snapshots, shard, state.derived, state.position, after)
    state.position = after
    again = []
    for call_id in call_ids:
        derived = state.derived.get(call_id)
        if stored[call_id] == derived:
            continue
        verdict = _compare(_unpacked(stored[call_id]), _unpacked(derived), before, state.snapshot)
        if verdict is None:
            again.append(call_id)
        elif verdict in LEFT:
            report.left[call_id] = verdict
        elif verdict == "differs":
            report.differing.append(call_id)
    return again


def _unpacked(packed: bytes | None) -> Doc | None:
    return None if packed is None else unpack_doc_or_empty(packed)


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _compare(
    stored: Doc | None, derived: Doc | None, cursor_before: str | None, snapshot: Snapshot
) -> str | None:
    """`same`, `differs`, a reason to leave the stored call as it is, or None: read again."""
    if stored == derived:
        return "same"
    if stored is None:
        assert derived is not None
        return "differs" if _first_change(derived) <= _id(cursor_before) else None
    if not _readable(stored):
        return "differs" if derived is not None else NOT_IN_LOG
    left = snapshot.underivable(stored["call_id"], first_log_id(stored))
    if derived is None:
        return left or NOT_IN_LOG
    if _id(last_change(stored)) < _id(last_change(derived)):
        return None
    if left is not None and _first_change(stored) < _first_change(derived):
        return left
    if published_revision(stored) > published_revision(derived):
        return NEWER_REVISION
    return "differs"


def _readable(doc: Doc) -> bool:
    return isinstance(doc.get("journal"), list) and last_change(doc) is not None


def first_log_id(doc: Doc) -> str | None:
    """The log id of the first entry a call journaled, or counted as overflow."""
    overflow = doc.get("overflow")
    if doc["journal"]:
        return doc["journal"][0]["log_id"]
    return overflow["first_log_id"] if overflow else None


def _first_change(doc: Doc) -> streamids.StreamId:
    return _id(first_log_id(doc))


def _id(log_id: str | None) -> streamids.StreamId:
    return streamids.parse(log_id) if log_id else (0, 0)


def _ids_by_shard(store: Store) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for call_id in store.docs.all_call_ids():
        found.setdefault(store.keys.shard_of(call_id), set()).add(call_id)
    return found


class HeldShards:
    """Every shard's drain lock, held under one token and renewed by a background thread until
    released."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.token = f"rebuild-{uuid.uuid4().hex}"
        self.held: list[int] = []
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="rebuild-locks", daemon=True)

    def acquire(self) -> None:
        locks = self.store.coordination.locks
        for shard in range(self.store.settings.shards):
            if not locks.acquire_waiting(shard, self.token, LOCK_WAIT_SECONDS):
                raise RuntimeError(f"shard {shard} is being drained; retry when it is idle")
            self.held.append(shard)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join()
        for shard in self.held:
            self.store.coordination.locks.release(shard, self.token)

    def _renew(self) -> None:
        while not self._stop.wait(self.store.settings.drain_lock_seconds / 3):
            self._renew_all()

    def _renew_all(self) -> None:
        # A renewal that fails is only logged: each shard's rewrite is fenced on its lock, so
        # it writes nothing if the lock was lost.
        for shard in self.held:
            try:
                if not self.store.coordination.locks.renew(shard, self.token):
                    log.warning("rebuild: lost the lock of shard %s", shard, extra={"shard": shard})
            except RedisError as exc:
                log.warning(
                    "rebuild: could not renew the lock of shard %s: %s",
                    shard,
                    exc,
                    extra={"shard": shard},
                )


@contextmanager
def holding_every_shard(store: Store) -> Iterator[HeldShards]:
    """Hold every shard's drain lock, renewed in the background, for the block's duration."""
    held = HeldShards(store)
    try:
        held.acquire()
        yield held
    finally:
        held.release()


def rebuild(store: Store, machine: CallMachine, batch: int | None = None) -> Report:
    """Rewrite every stored call that differs from what the log implies, at each shard's
    committed cursor, holding every shard's drain lock; nothing is applied twice or published:
    the cursors are not moved, and the backlog is left to the drainers."""
    snapshots = Snapshots(store, machine, batch)
    report = Report()
    with holding_every_shard(store) as held:
        stored_ids = _ids_by_shard(store)
        cursors = {shard: store.log.cursor(shard) for shard in range(store.settings.shards)}
        rewrites: dict[int, dict[str, Doc]] = {shard: {} for shard in cursors}
        active: dict[int, dict[str, Doc]] = {shard: {} for shard in cursors}
        for shard in range(store.settings.shards):
            snapshot = snapshots.load(shard)
            derived = derive_shard(snapshots, shard, snapshot, cursors[shard])
            ids = sorted(stored_ids.get(shard, set()) | derived.keys())
            report.compared += len(ids)
            for chunk in _chunks(ids, COMPARE_CHUNK):
                stored = store.docs.load_packed(chunk)
                for call_id in chunk:
                    if stored[call_id] == derived.get(call_id):
                        kept, rewrite = _unpacked(stored[call_id]), False
                    else:
                        kept, rewrite = _settle_one(
                            call_id, stored[call_id], derived.get(call_id), snapshot, report
                        )
                    if kept is not None and rewrite:
                        rewrites[shard][call_id] = kept
                    if kept is not None and _readable(kept) and is_active(kept):
                        active[shard][call_id] = kept
        for shard, cursor in cursors.items():
            if not store.docs.rewrite(held.token, shard, cursor, rewrites[shard], active[shard]):
                raise RuntimeError(
                    f"shard {shard}'s lock or cursor moved during the rebuild: nothing written "
                    f"from it on (shards before it were rewritten); run it again"
                )
            count_logged_anew(store, shard)
            report.rewritten += len(rewrites[shard])
    return report


def _settle_one(
    call_id: str, stored: bytes | None, packed: bytes | None, snapshot: Snapshot, report: Report
) -> tuple[Doc | None, bool]:
    """The document the call keeps, and whether it must be written: the derived one, or the
    stored one when the log cannot re-derive it (the reason recorded in `report`). Under the
    locks nothing moves, so a stored document behind the derived one differs."""
    kept, derived = _unpacked(stored), _unpacked(packed)
    if kept is None and derived is None:  # expired between the scan and its read
        return None, False
    verdict = _compare(kept, derived, None, snapshot) if kept is not None else "differs"
    if verdict in LEFT:
        report.left[call_id] = verdict
        return kept, False
    if verdict == "same":
        return kept, False
    report.differing.append(call_id)
    return derived, True
