"""Payload validation: each bad input is refused with a status and the field at fault."""

from __future__ import annotations

import json
from typing import Any

import pytest

from callstate.schema import PayloadError, parse_event
from tests.factories import body, event, example


def refusal(raw: bytes) -> PayloadError:
    with pytest.raises(PayloadError) as caught:
        parse_event(raw)
    return caught.value


def test_documented_examples_are_valid() -> None:
    for name in ("started", "ended"):
        payload = example(name)
        assert parse_event(body(payload)) == payload


def test_unknown_fields_are_kept() -> None:
    payload = event("c-1", "ringing", 5, queueId="q1", agent_status="AVAILABLE")
    assert parse_event(body(payload))["queueId"] == "q1"


def test_recording_notice_without_status_is_valid() -> None:
    notice = {"type": "recording", "call_id": "c-1", "recording_url": "https://r.example/1"}
    assert parse_event(body(notice)) == notice


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
        (broken(call_status=...), "call_status"),
        (broken(timestamp_ms=...), "timestamp_ms"),
        (broken(call_status="hungup"), "call_status"),
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
        (broken(project_id="25"), "project_id"),
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
    assert parse_event(broken(call_id=call_id))["call_id"] == call_id
