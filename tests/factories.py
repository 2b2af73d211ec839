"""Builders for realistic Stringee payloads, shared by unit and integration tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
