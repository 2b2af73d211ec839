"""What a Stringee webhook body must look like, and the error that names what is wrong with it.

The checks here are the webhook's wall: a body that passes them can be stored, re-encoded as
UTF-8 JSON and applied by the workers, so no sender can stop a shard with what it sends.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

CALL_STATUSES = ("created", "started", "ringing", "answered", "agentEnded", "ended")
# Not a state of the call: a `connect` action that failed (fallback URL, rejected transfer).
CONNECT_FAILED = "connect_failed"
STATUS_LIMIT = 64
PROJECT_ID_PATTERN = re.compile(r"[0-9]{1,18}")
CALL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")

# Stringee's bodies are two levels deep; this leaves room for unknown fields while staying far
# below the depth at which a recursive parser or encoder overflows.
MAX_DEPTH = 16
# JavaScript consumers of a record read numbers as doubles: beyond this they lose digits.
MAX_SAFE_INTEGER = 2**53 - 1
# A call of a day is already implausible; a duration beyond it is a sender's mistake or attack.
MAX_DURATION_SECONDS = 86_400
FIELD_NAME_LIMIT = 64

# Documented optional fields and the JSON types they must have; unknown fields are kept as-is.
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "project_id": (int, str),
    "event_id": (str,),
    "serial": (int,),
    "actor": (str,),
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
DURATION_FIELDS = ("duration", "answerDuration")

# One left-to-right pass over strings and brackets: a string that never closes swallows the
# rest of the text instead of being retried at every later quote (which would be quadratic).
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)
# Bodies logged by earlier versions were not bounded at 16; the workers must still read every
# one those versions applied, and bound the rest before any parser recurses.
LOGGED_MAX_DEPTH = 500
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


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


def parse_event(raw: bytes, latest_timestamp_ms: int) -> dict[str, Any]:
    """Decode and validate one webhook body; raise PayloadError naming the problem.

    `latest_timestamp_ms` is the newest event time believed: the server's clock plus the skew
    allowed, so that one far-future timestamp cannot make every later event of a call look late.
    """
    payload = _decode_plain(raw)
    if payload is None:
        payload = decode_body(raw)
        check_storable(payload, "")
    validate_event(payload, latest_timestamp_ms)
    return payload


def _decode_plain(raw: bytes) -> dict[str, Any] | None:
    """The body, decoded by orjson, when it is plainly what `decode_body` and `check_storable`
    accept; None when it may not be, for them to decide and name the problem.

    orjson refuses what they refuse (invalid UTF-8, a byte-order mark, NaN, a lone surrogate)
    or more (a number beyond a double), but parses an integer beyond 64 bits as a float and
    nests up to 1024 levels: those are left to the standard library's verdict."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) and _plain(payload, MAX_DEPTH - 1) else None


def _plain(container: dict[str, Any] | list[Any], depth_left: int) -> bool:
    """Whether a value orjson decoded nests no deeper than allowed and holds no integer beyond
    ±(2^53-1) nor a float that large (maybe an integer orjson could not hold)."""
    for value in container.values() if isinstance(container, dict) else container:
        kind = type(value)
        if kind is str or kind is bool or value is None:
            continue
        if kind is int or kind is float:
            if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
                return False
        elif depth_left == 0 or not _plain(value, depth_left - 1):
            return False
    return True


def decode_body(raw: bytes) -> dict[str, Any]:
    """A JSON object in strict JSON: UTF-8 without a byte-order mark, no NaN or Infinity, and
    nesting bounded before parsing (a recursion limit depends on the caller's stack, a bound
    does not)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(400, "invalid_json", f"body is not UTF-8: {exc}") from None
    return _parse_object(text, MAX_DEPTH, parse_constant=_refuse_constant)


def decode_logged(raw: bytes) -> dict[str, Any]:
    """A body as logged by any version of the webhook, as the workers read it: earlier versions
    took what the standard library takes (UTF-16, a byte-order mark, NaN), and the workers must
    keep applying those as they did; only nesting is bounded, so that no recursion limit ever
    decides a verdict."""
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    except (UnicodeDecodeError, LookupError) as exc:
        raise PayloadError(400, "invalid_json", f"body is not JSON text: {exc}") from None
    payload = _parse_object(text, LOGGED_MAX_DEPTH)
    # A lone surrogate (earlier webhooks let them through) must be refused here, entry by entry:
    # found only when a document is stored, its verdict would depend on what else the batch held.
    # The cheap tests first: nearly every body is ASCII without a \u escape.
    if ("\\u" in text or not text.isascii()) and _SURROGATE.search(text):
        check_storable(payload, "", numbers=False)
    return payload


def _parse_object(text: str, max_depth: int, **options: Any) -> dict[str, Any]:
    if nesting_exceeds(text, max_depth):
        raise PayloadError(422, "too_deep", f"JSON nested deeper than {max_depth} levels")
    try:
        payload = json.loads(text, **options)
    except ValueError as exc:
        raise PayloadError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise PayloadError(422, "invalid_payload", "body must be a JSON object")
    return payload


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def nesting_exceeds(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than `limit`, decided in linear time
    without parsing."""
    if text.count("{") + text.count("[") <= limit:
        return False
    depth = 0
    for match in _TOKEN.finditer(text):
        first = match.group()[0]
        if first in "[{":
            depth += 1
            if depth > limit:
                return True
        elif first in "]}":
            depth -= 1
    return False


def check_storable(value: Any, path: str, *, numbers: bool = True) -> None:
    """Every string must be encodable as UTF-8 (no lone surrogate) and, with `numbers`, every
    number exact in JSON readers that use doubles, and finite; raise PayloadError naming the
    first one that is not."""
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{_printable(key)}" if path else _printable(key)
            if not _encodable(key):
                raise PayloadError(422, "invalid_field", "field name is not valid UTF-8", child)
            check_storable(item, child, numbers=numbers)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_storable(item, f"{path}[{index}]", numbers=numbers)
    elif isinstance(value, str):
        if not _encodable(value):
            raise PayloadError(422, "invalid_field", f"{path} is not valid UTF-8 text", path)
    elif isinstance(value, bool) or value is None or not numbers:
        return
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            message = f"{path} is beyond ±(2^53-1), which JSON readers cannot hold exactly"
            raise PayloadError(422, "out_of_range", message, path)
    elif isinstance(value, float) and not math.isfinite(value):
        raise PayloadError(422, "out_of_range", f"{path} is not a finite number", path)


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    """A field name fit to quote back in an error: UTF-8 safe and short."""
    safe = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return safe if len(safe) <= FIELD_NAME_LIMIT else safe[:FIELD_NAME_LIMIT] + "..."


def is_annotation(payload: dict[str, Any]) -> bool:
    """A body that names a call but reports no state change: a recording notice, a DTMF or
    another callback without `call_status`."""
    return payload.get("call_status") is None


def project_id(payload: dict[str, Any]) -> int | None:
    """The project, as the documented integer whether it came as one or as a numeric string."""
    value = payload.get("project_id")
    if isinstance(value, str) and PROJECT_ID_PATTERN.fullmatch(value):
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def validate_event(payload: dict[str, Any], latest_timestamp_ms: int) -> None:
    """Check the fields callstate relies on; raise PayloadError for the first one that is wrong.

    Any `call_status` is stored (one callstate does not know is journaled, not refused), and a
    body without one is an annotation of its call."""
    _check_call_id(payload)
    _check_status(payload)
    _check_timestamp(payload, latest_timestamp_ms)
    for name, types in OPTIONAL_FIELDS.items():
        _check_type(payload, name, types, prefix="")
    if isinstance(payload.get("project_id"), str) and project_id(payload) is None:
        raise PayloadError(
            422, "invalid_field", "project_id must be an integer or a numeric string", "project_id"
        )
    for party in ("from", "to"):
        if isinstance(payload.get(party), dict):
            for name, types in PARTY_FIELDS.items():
                _check_type(payload[party], name, types, prefix=f"{party}.")
    for name in DURATION_FIELDS:
        _check_duration(payload, name)


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
    if status is not None and (not isinstance(status, str) or len(status) > STATUS_LIMIT):
        raise PayloadError(
            422,
            "invalid_field",
            f"call_status must be a string of at most {STATUS_LIMIT} characters",
            "call_status",
        )


def _check_timestamp(payload: dict[str, Any], latest_ms: int) -> None:
    if payload.get("timestamp_ms") is None:
        return
    value = payload["timestamp_ms"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PayloadError(
            422,
            "invalid_field",
            "timestamp_ms must be a non-negative integer (milliseconds)",
            "timestamp_ms",
        )
    if value > latest_ms:
        raise PayloadError(
            422,
            "out_of_range",
            f"timestamp_ms is in the future (after {latest_ms}): check the sender's clock",
            "timestamp_ms",
        )


def _check_duration(payload: dict[str, Any], name: str) -> None:
    value = payload.get(name)
    if isinstance(value, int) and not 0 <= value <= MAX_DURATION_SECONDS:
        raise PayloadError(
            422,
            "out_of_range",
            f"{name} must be between 0 and {MAX_DURATION_SECONDS} seconds",
            name,
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
