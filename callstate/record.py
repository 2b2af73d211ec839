"""The final call record (CDR): built from a call document once the call has ended."""

from __future__ import annotations

import re
from typing import Any

from callstate.calldoc import CallDoc, Leg, Record

SIP_LINE = re.compile(r"\s*([1-6]\d\d)\b")
BUSY_CODES = frozenset({486, 600, 603})
NO_ANSWER_CODES = frozenset({408, 480})
CANCELLED_CODES = frozenset({487})
# The version of callstate/schemas/record.schema.json that `build_record` follows; see the
# README's "The final record" for what changes it.
SCHEMA_VERSION = 1
# Not the call's data: neither makes a new revision. A stored record from before
# `schema_version` existed must not be republished for lacking it.
NOT_COMPARED = frozenset({"counts", "schema_version"})
DISPOSITIONS = ("answered", "busy", "no_answer", "cancelled", "failed", "unknown")
DIRECTIONS = ("inbound", "outbound")


def refresh_record(doc: CallDoc) -> Record | None:
    """Rebuild the ended call's record; return it when it is new or its data changed.

    Event counts alone do not make a revision: a duplicate delivered after the end would
    otherwise republish the same call; the record's counts are those as of its revision. Nor
    does `schema_version` alone.
    """
    if doc["status"] != "ended":
        return None
    old = doc["record"]
    record = build_record(doc, revision=old["revision"] if old else doc.get("first_revision", 1))
    if old is not None:
        if _compared(record) == _compared(old):
            return None
        record["revision"] = old["revision"] + 1
    doc["record"] = record
    return record


def build_record(doc: CallDoc, revision: int) -> Record:
    """Every field the provider reported for the call, plus what callstate derived from it."""
    fields = doc["fields"]
    cause = fields.get("endCallCause")
    direction = call_direction(fields)
    record: Record = dict(fields)
    record.update(
        {
            "call_id": doc["call_id"],
            "project_id": fields.get("project_id"),
            "account_sid": fields.get("account_sid"),
            "request_from_user_id": fields.get("request_from_user_id"),
            "from": fields.get("from"),
            "to": fields.get("to"),
            "clientCustomData": fields.get("clientCustomData"),
            "callCreatedReason": fields.get("callCreatedReason"),
            "callType": fields.get("callType"),
            "endCallCause": cause,
            "endedBy": fields.get("endedBy"),
            "duration": fields.get("duration"),
            "answerDuration": fields.get("answerDuration"),
            "timeline": dict(doc["timeline"]),
            "disposition": disposition(fields, doc["timeline"]),
            "sip_code": sip_code(cause),
            "direction": direction,
            "legs": [_leg(leg, direction) for leg in doc["legs"]],
            "closed_by": doc["closed_by"],
            "revision": revision,
            "counts": dict(doc["counts"]),
            "schema_version": SCHEMA_VERSION,
        }
    )
    return record


def _compared(record: Record) -> Record:
    return {name: value for name, value in record.items() if name not in NOT_COMPARED}


def record_end_ms(record: Record) -> int | None:
    """When the call ended, in the provider's milliseconds: its `ended` event's time, or, for a
    call the sweeper closed (no `ended` heard), the latest point of its timeline; else None."""
    timeline = record.get("timeline")
    if not isinstance(timeline, dict):
        return None
    ended = timeline.get("ended")
    if isinstance(ended, int):
        return ended
    return max((point for point in timeline.values() if isinstance(point, int)), default=None)


def sip_code(cause: Any) -> int | None:
    """The status code of an end cause that is a SIP status line, such as `486 Busy Here`."""
    if not isinstance(cause, str):
        return None
    match = SIP_LINE.match(cause)
    return int(match.group(1)) if match else None


def disposition(fields: dict[str, Any], timeline: dict[str, int]) -> str:
    """How the call went: answered, busy, no_answer, failed, cancelled or unknown."""
    answer = fields.get("answerDuration")
    if isinstance(answer, int) and answer > 0:
        return "answered"
    if answer is None and "answered" in timeline:
        return "answered"
    cause = fields.get("endCallCause")
    code = sip_code(cause)
    if code in BUSY_CODES:
        return "busy"
    if code in NO_ANSWER_CODES or cause == "MAX_CONNECT_TIME":
        return "no_answer"
    if code in CANCELLED_CODES:
        return "cancelled"
    if cause == "CAN_NOT_MAKE_CALL" or (code is not None and code >= 400):
        return "failed"
    if cause == "USER_END_CALL":
        return "cancelled"
    return "unknown"


def call_direction(fields: dict[str, Any]) -> str:
    return "inbound" if fields.get("callCreatedReason") == "EXTERNAL_CALL_IN" else "outbound"


def leg_agent(leg: Leg, direction: str) -> Any:
    """Who took a leg: on an inbound call the number it rang, on an outbound one the user who
    placed it; each falls back to the other."""
    if direction == "inbound":
        return leg["to_number"] or leg["user"]
    return leg["user"] or leg["to_number"]


def _leg(leg: Leg, direction: str) -> dict[str, Any]:
    agent = leg_agent(leg, direction)
    if leg["answered_ms"] is not None:
        outcome = "answered"
    elif leg["ended_ms"] is not None:
        outcome = "missed"
    else:
        outcome = "unknown"
    return {
        "agent": agent,
        "ringing_ms": leg["ringing_ms"],
        "answered_ms": leg["answered_ms"],
        "ended_ms": leg["ended_ms"],
        "outcome": outcome,
    }
