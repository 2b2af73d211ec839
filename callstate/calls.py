"""Applying log entries to call documents: verdicts, timeline, legs and sweeper closes.

Pure functions over JSON-ready dicts, shared by the workers and by `callstate rebuild`, so both
derive exactly the same state from the same log.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rq.timeouts import BaseTimeoutException

from callstate import streamids
from callstate.calldoc import CallDoc, JournalEntry, Leg, Record
from callstate.codec import dumps_sorted, pack_doc, unpack_doc
from callstate.config import Limits
from callstate.machine import FINAL, CallMachine
from callstate.record import refresh_record
from callstate.schema import (
    CALL_ID_PATTERN,
    CALL_STATUSES,
    CONNECT_FAILED,
    MAX_SAFE_INTEGER,
    is_annotation,
    project_id,
)

Doc = CallDoc
# Failures of the process, not of the entry being applied: they must stop the batch (it is retried
# later), never set an acknowledged event aside. RQ's job timeout arrives as an exception raised
# wherever the job happens to be.
PROCESS_ERRORS: tuple[type[BaseException], ...] = (
    MemoryError,
    RecursionError,
    BaseTimeoutException,
)
KNOWN_STATUSES = frozenset({*CALL_STATUSES, CONNECT_FAILED})
RESERVED_FIELDS = frozenset({"call_id", "call_status", "timestamp_ms"})
STATUS_TEXT_LIMIT = 64
UNREADABLE_UNTIL_MS = 2**62


@dataclass(frozen=True)
class LogEntry:
    """One entry of a shard's event log: a provider event, or a sweeper's close request.

    `problem` names the error that kept the entry from being decoded, if one did; `size` is
    the length of the body as received; `signer` the project whose own secret signed it.
    """

    log_id: str
    call_id: str
    payload: dict[str, Any]
    stale_before_ms: int | None = None
    problem: str | None = None
    size: int = 0
    signer: int | None = None

    @property
    def received_ms(self) -> int:
        return streamids.millis(self.log_id)


@dataclass(frozen=True)
class Tombstone:
    """What is kept of a retired call: its record's last revision, and until when events for
    its id are refused (`rejected: expired`) instead of starting a new call at revision 1."""

    revision: int
    until_ms: int

    def refuses(self, entry: LogEntry) -> bool:
        return entry.received_ms < self.until_ms

    def text(self) -> str:
        """As stored: `revision:until_ms`."""
        return f"{self.revision}:{self.until_ms}"

    @classmethod
    def parse(cls, raw: bytes) -> Tombstone:
        """A stored tombstone; one that cannot be read refuses its call's events for good (its
        revision unknown), the same in the drainer, the snapshot step and a rebuild."""
        revision, _, until_ms = raw.decode("ascii", "replace").partition(":")
        if not (revision.isdigit() and until_ms.isdigit()):
            return cls(0, UNREADABLE_UNTIL_MS)
        return cls(int(revision), int(until_ms))


@dataclass(frozen=True)
class Unprocessable:
    """A log entry set aside because applying it failed: where it is and the error's class."""

    log_id: str
    call_id: str
    error: str


@dataclass
class Applied:
    """What a batch changed: documents (and their stored form), records, entries set aside,
    and how many entries got each verdict (`verdict` or `verdict:reason`)."""

    changed: set[str] = field(default_factory=set)
    records: list[Record] = field(default_factory=list)
    unprocessable: list[Unprocessable] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    reopened: dict[str, tuple[Tombstone, int]] = field(default_factory=dict)
    verdicts: Counter[str] = field(default_factory=Counter)
    docs: dict[str, Doc] = field(default_factory=dict)
    packed: dict[str, bytes] = field(default_factory=dict)

    def pack(self, docs: dict[str, Doc | None]) -> Applied:
        """Keep the changed documents and their stored form; packing fails on what cannot be
        stored, which is why it happens here, before anything is committed."""
        self.docs = {call_id: _present(docs, call_id) for call_id in self.changed}
        self.packed = {call_id: pack_doc(doc) for call_id, doc in self.docs.items()}
        return self


def new_doc(call_id: str) -> Doc:
    return {
        "call_id": call_id,
        "status": None,
        "fields": {},
        "timeline": {},
        "last_timestamp_ms": None,
        "last_received_ms": None,
        "version": 0,
        "counts": {"accepted": 0, "duplicate": 0, "rejected": 0, "annotation": 0},
        "seen": [],
        "legs": [],
        "closed_by": None,
        "swept_from": None,
        "journal": [],
        "record": None,
    }


def is_active(doc: Doc) -> bool:
    return doc["status"] is not None and doc["status"] != FINAL


def published_revision(doc: Doc) -> int:
    """The last revision the call's record published (0: none, or a record unreadable)."""
    record = doc.get("record")
    revision = record.get("revision") if isinstance(record, dict) else None
    return revision if isinstance(revision, int) else 0


def last_change(doc: Doc) -> str | None:
    """The log id of the last entry that changed the call: every entry that changes a document
    is journaled, or once the journal is full, counted in its overflow (a sweeper's close is
    journaled even then)."""
    overflow = doc.get("overflow")
    journaled = doc["journal"][-1]["log_id"] if doc["journal"] else None
    return streamids.latest(journaled, overflow.get("last_log_id") if overflow else None)


def apply_entry(
    doc: Doc | None, entry: LogEntry, machine: CallMachine, limits: Limits
) -> tuple[Doc | None, Record | None]:
    """Apply one log entry; return the updated document and the record revision to emit, if any.

    Past `limits.max_events` journaled events a call's further events are only counted. An
    event that would take the bytes received for its call past `limits.max_call_bytes`, or that
    comes once the record has `limits.max_revisions` revisions, is rejected unapplied. So no
    sender can grow one document, or the records it publishes, without bound.
    """
    if entry.stale_before_ms is not None:
        if doc is None or not _is_stale(doc, entry.stale_before_ms):
            return doc, None
        _close_by_sweeper(doc, entry)
    else:
        doc = doc or new_doc(entry.call_id)
        if len(doc["journal"]) >= limits.max_events:
            _count_overflow(doc, entry)
        elif (bound := _bound_reached(doc, entry, limits)) is not None:
            _journal(doc, entry, "rejected", bound)
        elif _belongs_elsewhere(doc, entry):
            _journal(doc, entry, "rejected", "wrong_project")
        else:
            doc["bytes"] = doc.get("bytes", 0) + entry.size
            _apply_event(doc, entry, machine)
        doc["last_received_ms"] = entry.received_ms
    doc["version"] += 1
    return doc, refresh_record(doc)


def _belongs_elsewhere(doc: Doc, entry: LogEntry) -> bool:
    """A call belongs to the project of its first event that names one (by `project_id`, or by
    the project whose own secret signed it): one project's secret must not reach another's
    calls, and a call never changes project."""
    project = entry.signer if entry.signer is not None else project_id(entry.payload)
    if project is None:
        return False
    owner = doc.setdefault("project", project)
    return bool(owner != project)


def _bound_reached(doc: Doc, entry: LogEntry, limits: Limits) -> str | None:
    # Both only grow, so the verdict depends on the entries before, never on batch boundaries.
    if doc.get("bytes", 0) + entry.size > limits.max_call_bytes:
        return "too_large"
    record = doc["record"]
    if record is not None and record["revision"] >= limits.max_revisions:
        return "too_many_revisions"
    return None


def _count_overflow(doc: Doc, entry: LogEntry) -> None:
    """`rejected: too_many_events`: counted, and the range of log ids kept, nothing else."""
    overflow = doc.setdefault(
        "overflow", {"reason": "too_many_events", "count": 0, "first_log_id": entry.log_id}
    )
    overflow["count"] += 1
    overflow["last_log_id"] = entry.log_id
    doc["counts"]["rejected"] += 1


def _is_stale(doc: Doc, stale_before_ms: int) -> bool:
    last = doc["last_received_ms"]
    return is_active(doc) and last is not None and last < stale_before_ms


def _close_by_sweeper(doc: Doc, entry: LogEntry) -> None:
    doc["swept_from"] = doc["status"]
    doc["status"] = FINAL
    doc["closed_by"] = "sweeper"
    doc["journal"].append(_journal_entry(entry, "swept", "stale"))


def _apply_event(doc: Doc, entry: LogEntry, machine: CallMachine) -> None:
    payload = entry.payload
    identity = event_identity(payload)
    if identity in doc["seen"]:
        _journal(doc, entry, "duplicate", None)
        return
    doc["seen"].append(identity)
    status, timestamp = payload.get("call_status"), payload.get("timestamp_ms")
    if is_annotation(payload):
        _merge_fields(doc, payload, override=True, skip=frozenset({"type"}))
        _journal(doc, entry, "annotation", None)
    elif status not in KNOWN_STATUSES:
        _journal(doc, entry, "ignored", "unknown_status")
    elif not isinstance(timestamp, int):
        _journal(doc, entry, "ignored", "missing_timestamp")
    elif status == CONNECT_FAILED:
        # A failed `connect` action: Stringee goes on with the fallback, so the call does not
        # end here; it is kept in the timeline (and so in the record), its fields fill gaps.
        doc["timeline"].setdefault(status, timestamp)
        _merge_fields(doc, payload, override=False)
        _journal(doc, entry, "annotation", CONNECT_FAILED)
    elif _from_other_leg(doc, payload, status):
        _merge_fields(doc, payload, override=False)
        _journal(doc, entry, "duplicate", "other_leg")
    else:
        _apply_status(doc, entry, machine, status, timestamp)


def event_identity(payload: dict[str, Any]) -> str:
    """What makes two deliveries one event: the provider's `event_id` when it sends one, else
    (status, timestamp); for a body without either, its whole content."""
    event_id = payload.get("event_id")
    if isinstance(event_id, str) and event_id:
        return f"id:{event_id}"
    status, timestamp = payload.get("call_status"), payload.get("timestamp_ms")
    # Only statuses callstate knows key by name: none of them reads `id` or `note`.
    if status not in KNOWN_STATUSES or not isinstance(timestamp, int):
        digest = hashlib.sha1(dumps_sorted(payload).encode(), usedforsecurity=False)
        return f"note:{digest.hexdigest()[:16]}"
    return f"{status}:{timestamp}"


def _from_other_leg(doc: Doc, payload: dict[str, Any], status: str) -> bool:
    """In IVR mode every status fires on both legs, told apart by `actor` (empty on one of them
    in the body logged from production): a status the call already reached through another
    actor is that leg's echo, not a new transition. An agent's end starts the next agent's
    round, so a call center's next `ringing` is not an echo."""
    if "actor" not in payload:
        return False
    reached_by = doc.get("actors", {}).get(status)
    return reached_by is not None and reached_by != (payload["actor"] or "")


def _remember_actor(doc: Doc, payload: dict[str, Any], status: str) -> None:
    if "actor" not in payload:
        return
    actors = {} if status == "agentEnded" else doc.get("actors", {})
    doc["actors"] = actors | {status: payload["actor"] or ""}


def _apply_status(
    doc: Doc, entry: LogEntry, machine: CallMachine, status: str, timestamp: int
) -> None:
    payload = entry.payload
    reason = _rejection(doc, status, timestamp, machine)
    if reason is None:
        _accept(doc, payload, status, timestamp)
        _remember_actor(doc, payload, status)
        _journal(doc, entry, "accepted", None)
        return
    # State never moves back, but a late event still fills what the call does not know yet.
    doc["timeline"].setdefault(status, timestamp)
    _merge_fields(doc, payload, override=False)
    _journal(doc, entry, "rejected", reason)


def _rejection(doc: Doc, status: str, timestamp: int, machine: CallMachine) -> str | None:
    last = doc["last_timestamp_ms"]
    if last is not None and timestamp < last:
        return "out_of_order"
    reopens_swept = doc["closed_by"] == "sweeper" and status == FINAL
    if doc["status"] == FINAL and not reopens_swept:
        return "after_end"
    current = doc["swept_from"] if reopens_swept else doc["status"]
    if not machine.advance(current, status):
        return "illegal_transition"
    return None


def _accept(doc: Doc, payload: dict[str, Any], status: str, timestamp: int) -> None:
    doc["status"] = status
    doc["last_timestamp_ms"] = timestamp
    doc["timeline"].setdefault(status, timestamp)
    _merge_fields(doc, payload, override=True)
    _update_legs(doc["legs"], status, timestamp, payload)
    if status == FINAL:
        doc["closed_by"] = "ended_event"
        doc["swept_from"] = None


def _update_legs(legs: list[Leg], status: str, timestamp: int, payload: dict[str, Any]) -> None:
    """A leg is one agent's attempt: opened by ringing (or a bare answer), closed by an end."""
    open_leg = legs[-1] if legs and legs[-1]["ended_ms"] is None else None
    if status == "ringing" and open_leg is None:
        legs.append(_new_leg(payload, ringing_ms=timestamp))
    elif status == "answered":
        if open_leg is None:
            open_leg = _new_leg(payload, ringing_ms=None)
            legs.append(open_leg)
        open_leg["answered_ms"] = timestamp
    elif status in ("agentEnded", FINAL) and open_leg is not None:
        open_leg["ended_ms"] = timestamp


def _new_leg(payload: dict[str, Any], ringing_ms: int | None) -> Leg:
    to = payload.get("to") or {}
    return {
        "to_number": to.get("number"),
        "user": payload.get("request_from_user_id"),
        "ringing_ms": ringing_ms,
        "answered_ms": None,
        "ended_ms": None,
    }


def _merge_fields(
    doc: Doc, payload: dict[str, Any], *, override: bool, skip: frozenset[str] = frozenset()
) -> None:
    fields = doc["fields"]
    for name, value in payload.items():
        if name in RESERVED_FIELDS or name in skip:
            continue
        if override or name not in fields:
            fields[name] = project_id(payload) if name == "project_id" else value


def _journal(doc: Doc, entry: LogEntry, verdict: str, reason: str | None) -> None:
    counts = doc["counts"]
    counts[verdict] = counts.get(verdict, 0) + 1
    doc["journal"].append(_journal_entry(entry, verdict, reason))


def _journal_entry(entry: LogEntry, verdict: str, reason: str | None) -> JournalEntry:
    return {
        "log_id": entry.log_id,
        "verdict": verdict,
        "reason": reason,
        "call_status": entry.payload.get("call_status"),
        "timestamp_ms": entry.payload.get("timestamp_ms"),
    }


def _set_aside(
    docs: dict[str, Doc | None],
    entry: LogEntry,
    error: str,
    limits: Limits,
    retired: Mapping[str, Tombstone],
    applied: Applied,
) -> None:
    """`rejected: unprocessable`: journaled on its call when the call id is readable and the
    call is not retired, and reported, while the rest of the batch goes on."""
    applied.unprocessable.append(Unprocessable(entry.log_id, entry.call_id, error))
    applied.verdicts["rejected:unprocessable"] += 1
    if not CALL_ID_PATTERN.fullmatch(entry.call_id) or _refused(docs, entry, retired, applied):
        return
    doc = docs.get(entry.call_id)
    assert doc is not None
    if len(doc["journal"]) >= limits.max_events:
        _count_overflow(doc, entry)
    else:
        doc["counts"]["rejected"] += 1
        doc["journal"].append(
            JournalEntry(
                log_id=entry.log_id,
                verdict="rejected",
                reason="unprocessable",
                call_status=_plain(entry.payload.get("call_status"), str),
                timestamp_ms=_plain(entry.payload.get("timestamp_ms"), int),
                error=error,
            )
        )
    doc["version"] += 1
    docs[entry.call_id] = doc
    applied.changed.add(entry.call_id)


def _plain(value: Any, kind: type) -> Any:
    """A payload value fit to journal beside an error: short text or a safe integer, else None."""
    if kind is str and isinstance(value, str) and len(value) <= STATUS_TEXT_LIMIT:
        return value.encode("utf-8", "replace").decode("utf-8")
    if kind is int and type(value) is int and 0 <= value <= MAX_SAFE_INTEGER:
        return value
    return None


def apply_batch(
    docs: dict[str, Doc | None],
    reload: Callable[[], dict[str, Doc | None]],
    entries: list[LogEntry],
    machine: CallMachine,
    limits: Limits,
    tombstones: Mapping[str, Tombstone] | None = None,
) -> Applied:
    """Apply entries in log order to `docs`; an entry that fails is set aside, never the batch.

    The batch is first applied and packed as a whole, so isolation costs nothing while every
    entry succeeds. If anything fails, it is redone from `reload()` (the documents as they were
    before the batch) one entry at a time, keeping each document as it was before the entry that
    broke it. Only the entry and the documents decide, so live draining and rebuild agree.
    """
    retired = tombstones or {}
    try:
        return _apply_together(docs, entries, machine, limits, retired)
    except PROCESS_ERRORS:
        raise
    except Exception:  # whatever broke, the entry-by-entry pass names the entry
        return _apply_one_by_one(reload(), entries, machine, limits, retired)


def _apply_together(
    docs: dict[str, Doc | None],
    entries: list[LogEntry],
    machine: CallMachine,
    limits: Limits,
    retired: Mapping[str, Tombstone],
) -> Applied:
    applied = Applied()
    for entry in entries:
        if entry.problem is not None:
            _set_aside(docs, entry, entry.problem, limits, retired, applied)
        else:
            _apply_into(docs, entry, machine, limits, retired, applied)
    return applied.pack(docs)


def _apply_one_by_one(
    docs: dict[str, Doc | None],
    entries: list[LogEntry],
    machine: CallMachine,
    limits: Limits,
    retired: Mapping[str, Tombstone],
) -> Applied:
    applied = Applied()
    for entry in entries:
        if entry.problem is not None:
            _set_aside(docs, entry, entry.problem, limits, retired, applied)
            continue
        before = docs.get(entry.call_id)
        kept = pack_doc(before) if before is not None else None
        changed, records = set(applied.changed), len(applied.records)
        verdicts = Counter(applied.verdicts)
        try:
            _apply_into(docs, entry, machine, limits, retired, applied)
            if entry.call_id in applied.changed:
                pack_doc(_present(docs, entry.call_id))  # must stay storable after this entry
        except PROCESS_ERRORS:
            raise
        except Exception as exc:  # any other failure sets this one entry aside
            docs[entry.call_id] = unpack_doc(kept) if kept is not None else None
            applied.changed, applied.records = changed, applied.records[:records]
            applied.verdicts = verdicts
            _set_aside(docs, entry, error_name(exc), limits, retired, applied)
    return applied.pack(docs)


def error_name(exc: BaseException) -> str:
    """An exception's class, qualified unless built in: `KeyError`, `zlib.error`."""
    kind = type(exc)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _apply_into(
    docs: dict[str, Doc | None],
    entry: LogEntry,
    machine: CallMachine,
    limits: Limits,
    retired: Mapping[str, Tombstone],
    applied: Applied,
) -> None:
    if entry.stale_before_ms is None and _refused(docs, entry, retired, applied):
        applied.expired.append(entry.log_id)
        applied.verdicts["rejected:expired"] += 1
        return
    doc = docs.get(entry.call_id)
    version = doc["version"] if doc else None
    before = _verdicts_given(doc)
    doc, record = apply_entry(doc, entry, machine, limits)
    if doc is None or doc["version"] == version:
        # Only a sweeper's request changes nothing: its call was heard from since, or is gone.
        applied.verdicts["ignored:not_stale"] += 1
        return
    docs[entry.call_id] = doc
    applied.changed.add(entry.call_id)
    applied.verdicts[_verdict_given(doc, before)] += 1
    if record is not None:
        applied.records.append(record)


def _verdicts_given(doc: Doc | None) -> tuple[int, int]:
    """How many entries the call has journaled and counted as overflow."""
    if doc is None:
        return 0, 0
    overflow = doc.get("overflow")
    return len(doc["journal"]), overflow["count"] if overflow else 0


def _verdict_given(doc: Doc, before: tuple[int, int]) -> str:
    """The verdict of the entry just applied to `doc`: journaled, or counted as overflow."""
    if len(doc["journal"]) > before[0]:
        item = doc["journal"][-1]
        return f"{item['verdict']}:{item['reason']}" if item["reason"] else item["verdict"]
    return "rejected:too_many_events"


def _refused(
    docs: dict[str, Doc | None],
    entry: LogEntry,
    retired: Mapping[str, Tombstone],
    applied: Applied,
) -> bool:
    """Whether the entry's call is retired and still refuses events; otherwise the call has a
    document in `docs` after this, a new one numbering its revisions on from the tombstone's
    (noted in `applied.reopened`: the tombstone must then last as long as the new call's
    entries may be replayed), so no two revisions of one call id ever share a number."""
    if docs.get(entry.call_id) is not None:
        return False
    tombstone = retired.get(entry.call_id)
    if tombstone is not None and tombstone.refuses(entry):
        return True
    doc = new_doc(entry.call_id)
    if tombstone is not None:
        doc["first_revision"] = tombstone.revision + 1
        applied.reopened[entry.call_id] = (tombstone, entry.received_ms)
    docs[entry.call_id] = doc
    return False


def _present(docs: dict[str, Doc | None], call_id: str) -> Doc:
    doc = docs[call_id]
    assert doc is not None, call_id
    return doc
