"""Builders for realistic Stringee payloads, shared by unit and integration tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from callstate.calldoc import CallDoc, Record

DATA = Path(__file__).parent / "data"


def example(name: str) -> dict[str, Any]:
    """One of the provider's documented example payloads, as received."""
    loaded: dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    return loaded


def event(call_id: str, status: str, ts: int, **extra: Any) -> dict[str, Any]:
    """A call event shaped like the provider's, with `extra` fields added or replaced."""
    payload: dict[str, Any] = {
        "call_status": status,
        "project_id": 25,
        "request_from_user_id": "huydn",
        "account_sid": "ACab9b9bcf6391c6af9fe1663c729e3a6b",
        "timestamp_ms": ts,
        "from": {
            "number": "84899199866",
            "alias": "84899199866",
            "is_online": False,
            "type": "internal",
        },
        "to": {
            "number": "84909985668",
            "alias": "84909985668",
            "is_online": False,
            "type": "external",
        },
        "clientCustomData": "",
        "type": "stringee_call",
        "call_id": call_id,
    }
    payload.update(extra)
    return payload


def ended(call_id: str, ts: int, cause: str, answer_duration: int, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "callCreatedReason": "CLIENT_MAKE_CALL",
        "endCallCause": cause,
        "endedBy": "EXTERNAL",
        "callType": "CALL",
        "duration": answer_duration + 9,
        "answerDuration": answer_duration,
    }
    return event(call_id, "ended", ts, **(fields | extra))


def to_agent(number: str) -> dict[str, Any]:
    return {"number": number, "alias": number, "is_online": True, "type": "internal"}


def body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


SCENARIOS = ("answered", "busy", "no_answer", "failed", "call_center")


def scenario(call_id: str, kind: str, start_ms: int) -> list[dict[str, Any]]:
    """The in-order events of one realistic call of the given kind; timestamps strictly rise."""
    inbound = {"callCreatedReason": "EXTERNAL_CALL_IN"}
    steps: list[tuple[str, dict[str, Any]]]
    if kind == "answered":
        steps = [("created", {}), ("started", {}), ("ringing", {}), ("answered", {})]
        end = ("USER_END_CALL", 42)
    elif kind == "busy":
        steps, end = [("created", {}), ("ringing", {})], ("486 Busy Here", 0)
    elif kind == "no_answer":
        steps, end = [("ringing", {})], ("480 Temporarily Unavailable", 0)
    elif kind == "failed":
        steps, end = [("created", {})], ("CAN_NOT_MAKE_CALL", 0)
    else:
        steps = [("created", inbound)]
        for agent in ("agent-1", "agent-2"):
            steps += [
                ("ringing", {"to": to_agent(agent), **inbound}),
                ("agentEnded", {"to": to_agent(agent), **inbound}),
            ]
        steps += [
            ("ringing", {"to": to_agent("agent-3"), **inbound}),
            ("answered", {"to": to_agent("agent-3"), **inbound}),
        ]
        end = ("USER_END_CALL", 30)
    events = [
        event(call_id, status, start_ms + n, **extra) for n, (status, extra) in enumerate(steps)
    ]
    extra_end = inbound if kind == "call_center" else {}
    events.append(ended(call_id, start_ms + len(steps), end[0], end[1], **extra_end))
    return events


def record_of(doc: CallDoc | None) -> Record:
    """The record of a call that must have one."""
    assert doc is not None and doc["record"] is not None
    return doc["record"]


def known_burst(prefix: str) -> list[dict[str, Any]]:
    """Seven events of three calls whose every verdict is known: 5 accepted, 1 out of order, 1
    duplicate; one call ends (a record), one stays ringing and one answered."""
    a, b, c = f"{prefix}-a", f"{prefix}-b", f"{prefix}-c"
    return [
        event(a, "ringing", 100),
        event(a, "answered", 200),
        event(a, "ringing", 150),  # rejected: out_of_order
        event(a, "answered", 200),  # duplicate
        event(b, "ringing", 100),
        ended(b, 300, "USER_END_CALL", 0),  # a record
        event(c, "ringing", 100),
    ]
