"""Payload validation: each bad input is refused with a status and the field at fault."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callstate.schema import (
    MAX_DEPTH,
    MAX_DURATION_SECONDS,
    MAX_SAFE_INTEGER,
    PayloadError,
    check_storable,
    decode_body,
    parse_event,
    validate_event,
)
from tests.factories import body, event, example

# The newest event time the tests' webhook believes: far enough ahead for every fixture.
LATEST_MS = 2**53 - 1


def parse(raw: bytes) -> dict[str, Any]:
    return parse_event(raw, LATEST_MS)


def refusal(raw: bytes, latest_ms: int = LATEST_MS) -> PayloadError:
    with pytest.raises(PayloadError) as caught:
        parse_event(raw, latest_ms)
    return caught.value


def test_documented_examples_are_valid() -> None:
    for name in ("started", "ended"):
        payload = example(name)
        assert parse(body(payload)) == payload


def test_unknown_fields_are_kept() -> None:
    payload = event("c-1", "ringing", 5, queueId="q1", agent_status="AVAILABLE")
    assert parse(body(payload))["queueId"] == "q1"


def test_recording_notice_without_status_is_valid() -> None:
    notice = {"type": "recording", "call_id": "c-1", "recording_url": "https://r.example/1"}
    assert parse(body(notice)) == notice


def test_not_json_is_400() -> None:
    exc = refusal(b"{not json")
    assert (exc.status, exc.error) == (400, "invalid_json")
    assert refusal(b"\xff\xfe").status == 400


@pytest.mark.parametrize("raw", [b"[]", b"3", b'"x"', b"null"])
def test_not_an_object_is_422(raw: bytes) -> None:
    assert refusal(raw).status == 422


def broken(**changes: Any) -> bytes:
    payload = event("c-1", "ringing", 5)
    for name, value in changes.items():
        if value is ...:
            del payload[name]
        else:
            payload[name] = value
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (broken(call_id=...), "call_id"),
        (broken(call_status=3), "call_status"),
        (broken(timestamp_ms="1515859261381"), "timestamp_ms"),
        (broken(timestamp_ms=True), "timestamp_ms"),
        (broken(timestamp_ms=-1), "timestamp_ms"),
        (broken(timestamp_ms=1.5), "timestamp_ms"),
        (broken(call_id=""), "call_id"),
        (broken(call_id="a" * 129), "call_id"),
        (broken(call_id="../../etc"), "call_id"),
        (broken(call_id="call id"), "call_id"),
        (broken(call_id="x*"), "call_id"),
        (broken(call_id=12), "call_id"),
        (broken(project_id="25a"), "project_id"),
        (broken(call_status="x" * 65), "call_status"),
        (broken(event_id=7), "event_id"),
        (broken(duration=True), "duration"),
        (broken(to="84909985668"), "to"),
        (broken(**{"from": {"number": 84899199866}}), "from.number"),
    ],
)
def test_bad_field_is_422_naming_it(raw: bytes, field: str) -> None:
    exc = refusal(raw)
    assert exc.status == 422
    assert exc.field == field
    assert exc.to_json()["field"] == field


def test_call_id_of_128_safe_characters_is_accepted() -> None:
    call_id = "call-vn-1." + "A" * 118
    assert parse(broken(call_id=call_id))["call_id"] == call_id


def with_field(name: str, value_json: str) -> bytes:
    """A valid event with one field's JSON text spliced in as written (escapes kept)."""
    return body(event("c-1", "ringing", 5))[:-1] + f', "{name}": {value_json}}}'.encode()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (with_field("clientCustomData", r'"x\ud800y"'), "clientCustomData"),
        (with_field("queueId", r'"\udfff"'), "queueId"),
        (with_field("extra", r'{"deep": ["ok", "\udbff"]}'), "extra.deep[1]"),
        (with_field("from", r'{"number": "8490", "alias": "\ud800"}'), "from.alias"),
        (with_field("x\\ud800", '"value"'), "x\\ud800"),
    ],
)
def test_a_lone_surrogate_anywhere_is_422_naming_where(raw: bytes, field: str) -> None:
    exc = refusal(raw)
    assert (exc.status, exc.error, exc.field) == (422, "invalid_field", field)
    json.dumps(exc.to_json(), ensure_ascii=False).encode()


def test_a_surrogate_pair_is_a_character_and_accepted() -> None:
    assert parse(with_field("clientCustomData", r'"\ud83d\ude00"'))["clientCustomData"] == "😀"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"call_id": "c-1", "x": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes
        b"\xef\xbb\xbf" + body(event("c-1", "ringing", 5)),  # byte-order mark
        with_field("x", "NaN"),
        with_field("x", "-Infinity"),
        with_field("x", "1" * 5000),  # beyond Python's own integer-parsing limit
    ],
)
def test_not_strict_utf8_json_is_400(raw: bytes) -> None:
    assert (refusal(raw).status, refusal(raw).error) == (400, "invalid_json")


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def test_nesting_is_bounded_before_parsing() -> None:
    # The body itself is level 1: an extra field nested MAX_DEPTH - 1 deep is the most allowed.
    assert parse(with_field("extra", nested(MAX_DEPTH - 1)))["extra"]
    for raw in (
        with_field("extra", nested(MAX_DEPTH)),
        with_field("from", '{"number": "1", "x": ' + nested(MAX_DEPTH) + "}"),
        with_field("extra", nested(100_000)),  # would overflow a recursive parser
        b"[" * 60_000,
    ):
        exc = refusal(raw)
        assert (exc.status, exc.error) == (422, "too_deep")


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps("[" * 100 + '\\"{' * 50)
    assert parse(with_field("clientCustomData", text))["clientCustomData"].startswith("[[[")


@pytest.mark.parametrize(
    ("name", "value_json"),
    [
        ("timestamp_ms", str(10**40)),
        ("timestamp_ms", str(MAX_SAFE_INTEGER + 1)),
        ("project_id", str(-(MAX_SAFE_INTEGER + 1))),
        ("serial", str(2**64)),
        ("weight", "1e400"),
        ("duration", "-1"),
        ("answerDuration", str(MAX_DURATION_SECONDS + 1)),
    ],
)
def test_numbers_out_of_range_are_422_naming_the_field(name: str, value_json: str) -> None:
    exc = refusal(with_field(name, value_json))
    assert (exc.status, exc.error, exc.field) == (422, "out_of_range", name)


def test_numbers_at_their_bounds_are_accepted() -> None:
    assert parse(with_field("serial", str(MAX_SAFE_INTEGER)))["serial"] == MAX_SAFE_INTEGER
    assert parse(with_field("weight", "-1.5e300"))["weight"] == -1.5e300
    assert parse(with_field("duration", str(MAX_DURATION_SECONDS)))["duration"] > 0
    assert parse(with_field("answerDuration", "0"))["answerDuration"] == 0


def test_timestamp_beyond_the_allowed_skew_is_422() -> None:
    raw = body(event("c-1", "ringing", 5_000))
    assert parse_event(raw, latest_timestamp_ms=5_000)["timestamp_ms"] == 5_000
    exc = refusal(raw, latest_ms=4_999)
    assert (exc.status, exc.error, exc.field) == (422, "out_of_range", "timestamp_ms")
    notice = {"call_id": "c-1", "recording_url": "https://r.example/1", "timestamp_ms": 5_000}
    assert refusal(body(notice), latest_ms=4_999).field == "timestamp_ms"


@pytest.mark.parametrize(
    "raw",
    [
        broken(call_status=...),  # a DTMF or other callback that names a call: an annotation
        broken(timestamp_ms=...),  # stored, and journaled as ignored: nothing to order it by
        broken(call_status="connect_failed"),
        broken(call_status="dtmf_received"),  # unknown: stored and journaled, never refused
        broken(project_id="1237100"),
        broken(event_id="OI175MVQ57-1708736338885", serial=1, actor="", peerToPeer=True),
    ],
)
def test_every_real_shape_that_names_a_call_is_accepted(raw: bytes) -> None:
    assert parse(raw)["call_id"] == "c-1"


def strict_verdict(raw: bytes) -> Any:
    """What the standard library's path alone decides: the payload, or the refusal's terms."""
    try:
        payload = decode_body(raw)
        check_storable(payload, "")
        validate_event(payload, LATEST_MS)
    except PayloadError as exc:
        return (exc.status, exc.error, exc.field, exc.message)
    return payload


def verdict(raw: bytes) -> Any:
    try:
        return parse(raw)
    except PayloadError as exc:
        return (exc.status, exc.error, exc.field, exc.message)


def nested_body(depth: int) -> str:
    return '{"call_id":"c-1","x":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


# Where orjson and the standard library part: integers beyond 64 bits (orjson: a float), nesting
# (orjson: up to 1024), lone surrogates, NaN, a byte-order mark, numbers beyond a double.
EDGES = [
    '{"call_id":"c-1","x":18446744073709551616}',
    '{"call_id":"c-1","x":-9223372036854775809}',
    '{"call_id":"c-1","duration":100000000000000000000000}',
    '{"call_id":"c-1","x":9007199254740992}',
    '{"call_id":"c-1","x":-9007199254740991}',
    '{"call_id":"c-1","x":1.5e308}',
    '{"call_id":"c-1","x":1e400}',
    '{"call_id":"c-1","x":NaN}',
    '{"call_id":"c-1","x":"\\ud800"}',
    '{"call_id":"c-1","\\udc00":1}',
    '{"call_id":"c-1","x":"\\ud83d\\ude00"}',
    '{"call_id":"c-1","call_id":"c-2"}',
    '{"call_id":"c-1","x":[{"y":[1,2,{"z":null}]}]}',
    "\ufeff" + '{"call_id":"c-1"}',
    "[]",
    nested_body(MAX_DEPTH),
    nested_body(MAX_DEPTH + 1),
    nested_body(1100),
]


@pytest.mark.parametrize("text", EDGES)
def test_the_fast_parser_decides_as_the_standard_library(text: str) -> None:
    assert verdict(text.encode("utf-8", "surrogatepass")) == strict_verdict(
        text.encode("utf-8", "surrogatepass")
    )


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(st.characters(codec=None), max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    extra=st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=4), depth=st.integers(0, 20)
)
def test_any_body_gets_the_standard_librarys_verdict(extra: dict[str, Any], depth: int) -> None:
    payload = {"call_id": "c-1", "call_status": "ringing", **extra}
    raw = json.dumps(payload).encode()
    raw = raw[:-1] + f',"deep":{"[" * depth}{"]" * depth}}}'.encode()
    assert verdict(raw) == strict_verdict(raw)
