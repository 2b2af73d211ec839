"""Applying log entries to call documents: verdicts, timeline, legs and sweeper closes.

Pure functions over JSON-ready dicts, shared by the workers and by `callstate rebuild`, so both
derive exactly the same state from the same log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from callstate.machine import FINAL, CallMachine
from callstate.record import refresh_record
from callstate.schema import is_annotation

Doc = dict[str, Any]
RESERVED_FIELDS = frozenset({"call_id", "call_status", "timestamp_ms"})


@dataclass(frozen=True)
class LogEntry:
    """One entry of a shard's event log: a provider event, or a sweeper's close request."""

    log_id: str
    call_id: str
    payload: dict[str, Any]
    stale_before_ms: int | None = None

    @property
    def received_ms(self) -> int:
        """Stream ids start with the Redis server's clock in ms when the entry was logged."""
        return int(self.log_id.split("-", 1)[0])


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


def apply_entry(
    doc: Doc | None, entry: LogEntry, machine: CallMachine
) -> tuple[Doc | None, Doc | None]:
    """Apply one log entry; return the updated document and the record revision to emit, if any."""
    if entry.stale_before_ms is not None:
        if doc is None or not _is_stale(doc, entry.stale_before_ms):
            return doc, None
        _close_by_sweeper(doc, entry)
    else:
        doc = doc or new_doc(entry.call_id)
        _apply_event(doc, entry, machine)
        doc["last_received_ms"] = entry.received_ms
    doc["version"] += 1
    return doc, refresh_record(doc)


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
    if is_annotation(payload):
        _merge_fields(doc, payload, override=True, skip=frozenset({"type"}))
        _journal(doc, entry, "annotation", None)
        return
    status: str = payload["call_status"]
    timestamp: int = payload["timestamp_ms"]
    seen_key = f"{status}:{timestamp}"
    if seen_key in doc["seen"]:
        _journal(doc, entry, "duplicate", None)
        return
    doc["seen"].append(seen_key)
    reason = _rejection(doc, status, timestamp, machine)
    if reason is None:
        _accept(doc, payload, status, timestamp)
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


def _update_legs(
    legs: list[dict[str, Any]], status: str, timestamp: int, payload: dict[str, Any]
) -> None:
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


def _new_leg(payload: dict[str, Any], ringing_ms: int | None) -> dict[str, Any]:
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
            fields[name] = value


def _journal(doc: Doc, entry: LogEntry, verdict: str, reason: str | None) -> None:
    doc["counts"][verdict] += 1
    doc["journal"].append(_journal_entry(entry, verdict, reason))


def _journal_entry(entry: LogEntry, verdict: str, reason: str | None) -> dict[str, Any]:
    return {
        "log_id": entry.log_id,
        "verdict": verdict,
        "reason": reason,
        "call_status": entry.payload.get("call_status"),
        "timestamp_ms": entry.payload.get("timestamp_ms"),
    }


def public_view(doc: Doc) -> dict[str, Any]:
    """What `GET /calls/<id>` shows: the live state, without the journal and bookkeeping."""
    fields = doc["fields"]
    return {
        "call_id": doc["call_id"],
        "status": doc["status"],
        "active": is_active(doc),
        "from": fields.get("from"),
        "to": fields.get("to"),
        "request_from_user_id": fields.get("request_from_user_id"),
        "timeline": doc["timeline"],
        "last_timestamp_ms": doc["last_timestamp_ms"],
        "last_received_ms": doc["last_received_ms"],
        "version": doc["version"],
        "counts": doc["counts"],
        "closed_by": doc["closed_by"],
    }


def apply_entries(
    docs: dict[str, Doc | None], entries: list[LogEntry], machine: CallMachine
) -> tuple[set[str], list[Doc]]:
    """Apply entries in log order to `docs` in place; return the changed call ids and records."""
    changed: set[str] = set()
    records: list[Doc] = []
    for entry in entries:
        doc = docs.get(entry.call_id)
        version = doc["version"] if doc else None
        doc, record = apply_entry(doc, entry, machine)
        if doc is None:
            continue
        docs[entry.call_id] = doc
        if doc["version"] != version:
            changed.add(entry.call_id)
        if record is not None:
            records.append(record)
    return changed, records
