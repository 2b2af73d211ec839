"""The final record: disposition, SIP code and direction from what the provider reported."""

from __future__ import annotations

from typing import Any

import pytest

from callstate.record import disposition, sip_code
from tests.factories import ended, record_of


@pytest.mark.parametrize(
    ("cause", "answer_duration", "timeline", "expected"),
    [
        ("USER_END_CALL", 42, {}, "answered"),
        ("486 Busy Here", 0, {}, "busy"),
        ("603 Decline", 0, {}, "busy"),
        ("480 Temporarily Unavailable", 0, {}, "no_answer"),
        ("408 Request Timeout", 0, {}, "no_answer"),
        ("MAX_CONNECT_TIME", 0, {}, "no_answer"),
        ("487 Request Terminated", 0, {}, "cancelled"),
        ("USER_END_CALL", 0, {}, "cancelled"),
        ("CAN_NOT_MAKE_CALL", 0, {}, "failed"),
        ("404 Not Found", 0, {}, "failed"),
        ("503 Service Unavailable", 0, {}, "failed"),
        ("SOMETHING_NEW", 0, {}, "unknown"),
        (None, None, {"answered": 5}, "answered"),
        (None, None, {"ringing": 5}, "unknown"),
        ("486 Busy Here", 3, {}, "answered"),
    ],
)
def test_disposition(
    cause: str | None, answer_duration: int | None, timeline: dict[str, int], expected: str
) -> None:
    fields: dict[str, Any] = {"endCallCause": cause, "answerDuration": answer_duration}
    assert disposition(fields, timeline) == expected


@pytest.mark.parametrize(
    ("cause", "code"),
    [("486 Busy Here", 486), ("480", 480), ("USER_END_CALL", None), (None, None), ("4860", None)],
)
def test_sip_code(cause: str | None, code: int | None) -> None:
    assert sip_code(cause) == code


def test_record_of_the_documented_end_event(deliver: Any) -> None:
    doc = deliver(ended("c-1", 1538369461077, "486 Busy Here", 0, clientCustomData="x"))
    record = doc["record"]
    assert record["call_id"] == "c-1"
    assert record["disposition"] == "busy"
    assert record["sip_code"] == 486
    assert record["direction"] == "outbound"
    assert record["duration"] == 9
    assert record["answerDuration"] == 0
    assert record["closed_by"] == "ended_event"
    assert record["revision"] == 1
    assert record["clientCustomData"] == "x"
    assert record["timeline"] == {"ended": 1538369461077}
    for name in (
        "project_id",
        "account_sid",
        "request_from_user_id",
        "from",
        "to",
        "callCreatedReason",
        "callType",
        "endedBy",
        "legs",
        "counts",
    ):
        assert name in record


def test_inbound_call_direction(deliver: Any) -> None:
    doc = deliver(ended("c-2", 10, "USER_END_CALL", 5, callCreatedReason="EXTERNAL_CALL_IN"))
    assert record_of(doc)["direction"] == "inbound"
