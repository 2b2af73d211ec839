"""Re-deriving every call from its shard's snapshot and the log after it, the source of truth.

`check` compares each shard at its committed cursor, on a live system: a document read while a
drainer moved on is read again, never reported. `rebuild` holds every shard's drain lock for
its whole run (renewed), derives each shard at its cursor, and rewrites only what differs, in
one transaction fenced on the cursors. It never removes or degrades a call the store holds:
what the log cannot re-derive is left as it is, with the reason.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from callstate import streamids
from callstate.calls import Doc, LogEntry, apply_batch, is_active, last_change
from callstate.codec import unpack_doc
from callstate.machine import CallMachine
from callstate.snapshots import Snapshot, Snapshots
from callstate.store import Store

SETTLE_ROUNDS = 20
NOT_IN_LOG = "not_in_log"
HISTORY_TRIMMED = "history_trimmed"


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
    return extend(snapshots, shard, dict(snapshot.docs), snapshot.position, upto)


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
    while True:
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


def _settle(
    store: Store,
    snapshots: Snapshots,
    shard: int,
    state: ShardState,
    call_ids: set[str],
    report: Report,
) -> None:
    """Compare each call at the position of its stored document: a document that changed
    between the two reads is read again, with the derivation carried to the new cursor."""
    unsettled = set(call_ids)
    report.compared += len(unsettled)
    for _ in range(SETTLE_ROUNDS):
        before = store.log.cursor(shard)
        stored = store.docs.load_docs(sorted(unsettled))
        after = store.log.cursor(shard)
        extend(snapshots, shard, state.derived, state.position, after)
        state.position = after
        for call_id in sorted(unsettled):
            derived = state.derived.get(call_id)
            verdict = _compare(
                stored[call_id], unpack_doc(derived) if derived else None, before, state.snapshot
            )
            if verdict is None:
                continue
            unsettled.discard(call_id)
            if verdict in (NOT_IN_LOG, HISTORY_TRIMMED):
                report.left[call_id] = verdict
            elif verdict == "differs":
                report.differing.append(call_id)
        if not unsettled:
            return
    report.differing += sorted(unsettled)


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
    if derived is None:
        return HISTORY_TRIMMED if _history_trimmed(stored, snapshot) else NOT_IN_LOG
    if _id(last_change(stored)) < _id(last_change(derived)):
        return None
    if _history_trimmed(stored, snapshot) and _first_change(stored) < _first_change(derived):
        return HISTORY_TRIMMED
    return "differs"


def _readable(doc: Doc) -> bool:
    return isinstance(doc.get("journal"), list) and last_change(doc) is not None


def _first_change(doc: Doc) -> streamids.StreamId:
    overflow = doc.get("overflow")
    first = doc["journal"][0]["log_id"] if doc["journal"] else overflow and overflow["first_log_id"]
    return _id(first)


def _history_trimmed(doc: Doc, snapshot: Snapshot) -> bool:
    """A call whose first entries were trimmed before snapshots were kept (an upgraded
    deployment): the log can no longer re-derive it, so it is left as stored."""
    return doc["call_id"] not in snapshot.docs and (
        snapshot.position is None or _first_change(doc) <= _id(snapshot.position)
    )


def _id(log_id: str | None) -> streamids.StreamId:
    return streamids.parse(log_id) if log_id else (0, 0)


def _ids_by_shard(store: Store) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for call_id in store.docs.all_call_ids():
        found.setdefault(store.keys.shard_of(call_id), set()).add(call_id)
    return found


@contextmanager
def holding_every_shard(store: Store) -> Iterator[str]:
    """Hold every shard's drain lock, renewed in the background, for the block's duration."""
    token = f"rebuild-{uuid.uuid4().hex}"
    held: list[int] = []
    stop = threading.Event()
    renew_seconds = store.settings.drain_lock_seconds / 3

    def renew() -> None:
        while not stop.wait(renew_seconds):
            for shard in held:
                store.coordination.renew_drain_lock(shard, token)

    renewer = threading.Thread(target=renew, name="rebuild-lock-renewer", daemon=True)
    try:
        for shard in range(store.settings.shards):
            if not store.coordination.acquire_drain_lock(shard, token):
                raise RuntimeError(f"shard {shard} is being drained; retry when it is idle")
            held.append(shard)
        renewer.start()
        yield token
    finally:
        stop.set()
        if renewer.is_alive():
            renewer.join()
        for shard in held:
            store.coordination.release_drain_lock(shard, token)


def rebuild(store: Store, machine: CallMachine, batch: int | None = None) -> Report:
    """Rewrite every stored call that differs from what the log implies, at each shard's
    committed cursor, holding every shard's drain lock; nothing is applied twice or published:
    the cursors are not moved, and the backlog is left to the drainers."""
    snapshots = Snapshots(store, machine, batch)
    report = Report()
    stored_ids = _ids_by_shard(store)
    with holding_every_shard(store):
        cursors = {shard: store.log.cursor(shard) for shard in range(store.settings.shards)}
        rewrites: dict[str, Doc] = {}
        active: dict[str, Doc] = {}
        for shard in range(store.settings.shards):
            snapshot = snapshots.load(shard)
            derived = derive_shard(snapshots, shard, snapshot, cursors[shard])
            ids = sorted(stored_ids.get(shard, set()) | derived.keys())
            stored = store.docs.load_docs(ids)
            report.compared += len(ids)
            for call_id in ids:
                kept = _settle_one(call_id, stored[call_id], derived.get(call_id), snapshot, report)
                if kept is not None and kept is not stored[call_id]:
                    rewrites[call_id] = kept
                if kept is not None and _readable(kept) and is_active(kept):
                    active[call_id] = kept
        if not store.docs.rewrite(cursors, rewrites, active):
            raise RuntimeError("a drainer committed during the rebuild; nothing written, run again")
    report.rewritten = len(rewrites)
    return report


def _settle_one(
    call_id: str, stored: Doc | None, packed: bytes | None, snapshot: Snapshot, report: Report
) -> Doc | None:
    """The document the call keeps: the derived one, or the stored one when the log cannot
    re-derive it (the reason recorded in `report`). Under the locks nothing moves, so a stored
    document behind the derived one differs."""
    derived = unpack_doc(packed) if packed else None
    verdict = _compare(stored, derived, None, snapshot) if stored is not None else "differs"
    if verdict in (NOT_IN_LOG, HISTORY_TRIMMED):
        report.left[call_id] = verdict
        return stored
    if verdict == "same":
        return stored
    report.differing.append(call_id)
    return derived
