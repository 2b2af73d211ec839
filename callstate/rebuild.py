"""Re-deriving every call's state, journal and record from the event log, the source of truth."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from callstate.calls import Doc, LogEntry, apply_batch
from callstate.codec import unpack_doc
from callstate.config import Settings
from callstate.machine import CallMachine
from callstate.store import Store


@dataclass
class Derived:
    """What the log implies: every call's document and each shard's last log id."""

    docs: dict[str, Doc] = field(default_factory=dict)
    cursors: dict[int, str | None] = field(default_factory=dict)


def derive(store: Store, machine: CallMachine, batch: int) -> Derived:
    """Replay every shard's log from its first entry, exactly as the drainers applied it.

    Documents are kept in their stored form between batches, as in Redis, so an entry that
    cannot be applied is set aside here exactly as a drainer sets it aside.
    """
    derived = Derived()
    packed: dict[str, bytes] = {}
    for shard in range(store.settings.shards):
        cursor = None
        for entries in store.iter_log(shard, batch):
            packed.update(_apply_stored(packed, entries, machine, store.settings))
            cursor = entries[-1].log_id
        derived.cursors[shard] = cursor
    derived.docs = {call_id: unpack_doc(stored) for call_id, stored in packed.items()}
    return derived


def _apply_stored(
    packed: dict[str, bytes], entries: list[LogEntry], machine: CallMachine, settings: Settings
) -> dict[str, bytes]:
    call_ids = {entry.call_id for entry in entries}

    def load() -> dict[str, Doc | None]:
        return {c: unpack_doc(packed[c]) if c in packed else None for c in call_ids}

    return apply_batch(load(), load, entries, machine, settings.call_limits).packed


def differences(store: Store, derived: Derived) -> list[str]:
    """Call ids whose stored document differs from the derived one (missing counts as differing)."""
    ids = sorted(store.all_call_ids() | derived.docs.keys())
    stored = store.load_docs(ids)
    return [call_id for call_id in ids if stored[call_id] != derived.docs.get(call_id)]


def rebuild(store: Store, machine: CallMachine, batch: int) -> Derived:
    """Replace every projection with what the log implies, holding every shard's drain lock."""
    token = f"rebuild-{uuid.uuid4().hex}"
    held: list[int] = []
    try:
        for shard in range(store.settings.shards):
            if not store.acquire_drain_lock(shard, token):
                raise RuntimeError(f"shard {shard} is being drained; retry when it is idle")
            held.append(shard)
        derived = derive(store, machine, batch)
        store.replace_all(derived.docs, derived.cursors)
        return derived
    finally:
        for shard in held:
            store.release_drain_lock(shard, token)
