"""What a Stringee webhook body must look like, and the error that names what is wrong with it."""

from __future__ import annotations

import json
import re
from typing import Any

CALL_STATUSES = ("created", "started", "ringing", "answered", "agentEnded", "ended")
CALL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")

# Documented optional fields and the JSON types they must have; unknown fields are kept as-is.
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "project_id": (int,),
    "request_from_user_id": (str,),
    "account_sid": (str,),
    "from": (dict,),
    "to": (dict,),
    "type": (str,),
    "clientCustomData": (str,),
    "callCreatedReason": (str,),
    "endCallCause": (str,),
    "endedBy": (str,),
    "callType": (str,),
    "duration": (int,),
    "answerDuration": (int,),
    "recording_url": (str,),
}
PARTY_FIELDS: dict[str, tuple[type, ...]] = {
    "number": (str,),
    "alias": (str,),
    "is_online": (bool,),
    "type": (str,),
}


class PayloadError(Exception):
    """A delivery that cannot be accepted: the HTTP status, the field at fault and why."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


def parse_event(raw: bytes) -> dict[str, Any]:
    """Decode and validate one webhook body; raise PayloadError naming the problem."""
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise PayloadError(422, "invalid_payload", "body must be a JSON object")
    validate_event(payload)
    return payload


def is_annotation(payload: dict[str, Any]) -> bool:
    """A recording notice: it names a call but reports no state change."""
    return "call_status" not in payload and "recording_url" in payload


def validate_event(payload: dict[str, Any]) -> None:
    """Check the fields callstate relies on; raise PayloadError for the first one that is wrong."""
    _check_call_id(payload)
    if not is_annotation(payload):
        _check_status(payload)
        _check_timestamp(payload, required=True)
    else:
        _check_timestamp(payload, required=False)
    for name, types in OPTIONAL_FIELDS.items():
        _check_type(payload, name, types, prefix="")
    for party in ("from", "to"):
        if isinstance(payload.get(party), dict):
            for name, types in PARTY_FIELDS.items():
                _check_type(payload[party], name, types, prefix=f"{party}.")


def _check_call_id(payload: dict[str, Any]) -> None:
    call_id = payload.get("call_id")
    if call_id is None:
        raise PayloadError(422, "missing_field", "call_id is required", "call_id")
    if not isinstance(call_id, str) or not CALL_ID_PATTERN.fullmatch(call_id):
        raise PayloadError(
            422,
            "invalid_field",
            "call_id must be 1-128 characters of letters, digits and . _ : @ -",
            "call_id",
        )


def _check_status(payload: dict[str, Any]) -> None:
    status = payload.get("call_status")
    if status is None:
        raise PayloadError(422, "missing_field", "call_status is required", "call_status")
    if status not in CALL_STATUSES:
        raise PayloadError(
            422,
            "invalid_field",
            f"call_status must be one of {', '.join(CALL_STATUSES)}",
            "call_status",
        )


def _check_timestamp(payload: dict[str, Any], *, required: bool) -> None:
    if "timestamp_ms" not in payload:
        if required:
            raise PayloadError(422, "missing_field", "timestamp_ms is required", "timestamp_ms")
        return
    value = payload["timestamp_ms"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PayloadError(
            422,
            "invalid_field",
            "timestamp_ms must be a non-negative integer (milliseconds)",
            "timestamp_ms",
        )


def _check_type(
    payload: dict[str, Any], name: str, types: tuple[type, ...], *, prefix: str
) -> None:
    if name not in payload or payload[name] is None:
        return
    value = payload[name]
    wrong_bool = isinstance(value, bool) and bool not in types
    if wrong_bool or not isinstance(value, types):
        expected = " or ".join(_JSON_NAMES[t] for t in types)
        raise PayloadError(
            422, "invalid_field", f"{prefix}{name} must be {expected}", f"{prefix}{name}"
        )


_JSON_NAMES = {int: "an integer", str: "a string", dict: "an object", bool: "a boolean"}
