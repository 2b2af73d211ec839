"""Verdicts, timeline, legs and sweeper closes, applied through the store and the drainer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from callstate.calls import Doc, LogEntry, apply_entry, new_doc
from callstate.config import DEFAULT_LIMITS
from callstate.machine import CallMachine
from tests.factories import ended, event, record_of, to_agent

Deliver = Callable[..., Doc]
CALL = "call-vn-1-TEST-1"

MAX_EVENTS = DEFAULT_LIMITS


def verdicts(doc: Doc) -> list[tuple[str, str | None]]:
    return [(item["verdict"], item["reason"]) for item in doc["journal"]]


def test_in_order_events_are_all_accepted(deliver: Deliver) -> None:
    doc = deliver(
        event(CALL, "created", 1000),
        event(CALL, "started", 1001),
        event(CALL, "ringing", 1002),
        event(CALL, "answered", 1003),
        ended(CALL, 1010, "USER_END_CALL", 7),
    )
    assert doc["status"] == "ended"
    assert verdicts(doc) == [("accepted", None)] * 5
    assert doc["timeline"] == {
        "created": 1000,
        "started": 1001,
        "ringing": 1002,
        "answered": 1003,
        "ended": 1010,
    }
    assert doc["counts"] == {"accepted": 5, "duplicate": 0, "rejected": 0, "annotation": 0}
    assert doc["version"] == 5


def test_duplicate_is_journaled_not_applied_nor_counted_as_rejection(deliver: Deliver) -> None:
    doc = deliver(
        event(CALL, "ringing", 1002),
        event(CALL, "ringing", 1002),
        event(CALL, "answered", 1003),
        event(CALL, "answered", 1003),
    )
    assert verdicts(doc) == [
        ("accepted", None),
        ("duplicate", None),
        ("accepted", None),
        ("duplicate", None),
    ]
    assert doc["counts"]["duplicate"] == 2
    assert doc["counts"]["rejected"] == 0
    assert doc["status"] == "answered"


def test_older_event_is_rejected_out_of_order_but_fills_an_empty_timeline_slot(
    deliver: Deliver,
) -> None:
    doc = deliver(
        event(CALL, "answered", 2000),
        event(CALL, "ringing", 1500),
        event(CALL, "answered", 1999),
    )
    assert verdicts(doc)[1:] == [("rejected", "out_of_order"), ("rejected", "out_of_order")]
    assert doc["status"] == "answered"
    assert doc["timeline"] == {"answered": 2000, "ringing": 1500}
    assert doc["last_timestamp_ms"] == 2000


def test_equal_timestamps_go_to_the_table(deliver: Deliver) -> None:
    doc = deliver(event(CALL, "ringing", 1000), event(CALL, "answered", 1000))
    assert verdicts(doc) == [("accepted", None), ("accepted", None)]
    backwards = deliver(event("c-2", "answered", 1000), event("c-2", "ringing", 1000))
    assert verdicts(backwards)[1] == ("rejected", "illegal_transition")


def test_illegal_transition_is_rejected_and_state_stays(deliver: Deliver) -> None:
    doc = deliver(event(CALL, "answered", 1000), event(CALL, "started", 1001))
    assert verdicts(doc)[1] == ("rejected", "illegal_transition")
    assert doc["status"] == "answered"
    assert doc["last_timestamp_ms"] == 1000


def test_any_new_status_after_end_is_rejected_after_end(deliver: Deliver) -> None:
    doc = deliver(
        event(CALL, "answered", 1000),
        ended(CALL, 2000, "USER_END_CALL", 5),
        event(CALL, "ringing", 3000),
        ended(CALL, 3001, "USER_END_CALL", 5),
    )
    assert verdicts(doc)[2:] == [("rejected", "after_end"), ("rejected", "after_end")]
    assert doc["status"] == "ended"
    assert doc["timeline"]["ended"] == 2000


def test_a_late_answer_after_the_end_is_rejected_yet_fills_the_timeline_and_missing_fields(
    deliver: Deliver,
) -> None:
    """State never moves back past the end, but what the late event tells that the call did not
    know yet is kept, and what it did know is not overwritten."""
    doc = deliver(
        event(CALL, "ringing", 1000, to=to_agent("100")),
        ended(CALL, 2000, "USER_END_CALL", 30, to=to_agent("100")),
        event(CALL, "answered", 2100, to=to_agent("200"), queueId="q-7"),
    )
    assert verdicts(doc)[2] == ("rejected", "after_end")
    assert (doc["status"], doc["last_timestamp_ms"]) == ("ended", 2000)
    assert doc["timeline"] == {"ringing": 1000, "ended": 2000, "answered": 2100}
    assert doc["fields"]["queueId"] == "q-7"
    assert doc["fields"]["to"]["number"] == "100"


def test_first_event_of_a_call_may_be_any_status(machine: CallMachine) -> None:
    for status in ("created", "started", "ringing", "answered", "agentEnded", "ended"):
        entry = LogEntry("5-0", f"c-{status}", event(f"c-{status}", status, 1))
        doc, _ = apply_entry(None, entry, machine, MAX_EVENTS)
        assert doc is not None
        assert doc["status"] == status
        assert doc["journal"][0]["verdict"] == "accepted"


def test_rejected_event_keeps_its_data_without_overriding_accepted_data(deliver: Deliver) -> None:
    late = event(CALL, "ringing", 500, queueId="q-7", to=to_agent("200"))
    doc = deliver(event(CALL, "answered", 1000, to=to_agent("100")), late)
    assert doc["fields"]["queueId"] == "q-7"
    assert doc["fields"]["to"]["number"] == "100"


def test_annotation_merges_fields_and_counts_separately(deliver: Deliver) -> None:
    notice = {"type": "recording", "call_id": CALL, "recording_url": "https://rec.example/1.mp3"}
    doc = deliver(event(CALL, "answered", 1000), notice)
    assert verdicts(doc)[1] == ("annotation", None)
    assert doc["fields"]["recording_url"] == "https://rec.example/1.mp3"
    assert doc["fields"]["type"] == "stringee_call"
    assert doc["counts"]["annotation"] == 1
    assert doc["status"] == "answered"


def test_call_center_legs_follow_agents(deliver: Deliver) -> None:
    inbound = {"callCreatedReason": "EXTERNAL_CALL_IN"}
    doc = deliver(
        event(CALL, "created", 1000, **inbound),
        event(CALL, "ringing", 1001, to=to_agent("agent-1"), **inbound),
        event(CALL, "agentEnded", 1005, to=to_agent("agent-1"), **inbound),
        event(CALL, "ringing", 1006, to=to_agent("agent-2"), **inbound),
        event(CALL, "answered", 1008, to=to_agent("agent-2"), **inbound),
        ended(CALL, 1100, "USER_END_CALL", 92, **inbound),
    )
    assert verdicts(doc) == [("accepted", None)] * 6
    assert doc["timeline"]["ringing"] == 1001
    legs = record_of(doc)["legs"]
    assert legs == [
        {
            "agent": "agent-1",
            "ringing_ms": 1001,
            "answered_ms": None,
            "ended_ms": 1005,
            "outcome": "missed",
        },
        {
            "agent": "agent-2",
            "ringing_ms": 1006,
            "answered_ms": 1008,
            "ended_ms": 1100,
            "outcome": "answered",
        },
    ]


def sweep(doc: Doc | None, machine: CallMachine, log_id: str, before_ms: int) -> Doc | None:
    found, _ = apply_entry(
        doc, LogEntry(log_id, CALL, {}, stale_before_ms=before_ms), machine, MAX_EVENTS
    )
    return found


def accepted(doc: Doc | None, machine: CallMachine, log_id: str, payload: dict[str, Any]) -> Doc:
    found, _ = apply_entry(doc, LogEntry(log_id, CALL, payload), machine, MAX_EVENTS)
    assert found is not None
    return found


def test_sweeper_closes_only_silent_active_calls(machine: CallMachine) -> None:
    assert sweep(None, machine, "9000-0", 8000) is None
    doc = accepted(None, machine, "1000-0", event(CALL, "ringing", 10))
    still = sweep(doc, machine, "1500-0", 900)
    assert still is not None
    assert still["status"] == "ringing"
    assert still["version"] == 1
    closed = sweep(doc, machine, "9000-0", 8000)
    assert closed is not None
    assert closed["status"] == "ended"
    assert closed["closed_by"] == "sweeper"
    assert record_of(closed)["closed_by"] == "sweeper"
    assert record_of(closed)["revision"] == 1
    assert closed["journal"][-1]["verdict"] == "swept"


def test_real_end_after_sweeper_close_revises_the_record(machine: CallMachine) -> None:
    swept = sweep(
        accepted(None, machine, "1000-0", event(CALL, "answered", 10)), machine, "9000-0", 8000
    )
    doc, record = apply_entry(
        swept, LogEntry("9500-0", CALL, ended(CALL, 50, "USER_END_CALL", 40)), machine, MAX_EVENTS
    )
    assert doc is not None and record is not None
    assert doc["journal"][-1]["verdict"] == "accepted"
    assert record["closed_by"] == "ended_event"
    assert record["revision"] == 2
    assert record["disposition"] == "answered"
    after, _ = apply_entry(
        doc, LogEntry("9600-0", CALL, event(CALL, "ringing", 60)), machine, MAX_EVENTS
    )
    assert after is not None
    assert after["journal"][-1]["reason"] == "after_end"


def test_annotation_after_end_makes_a_new_revision(machine: CallMachine) -> None:
    first = accepted(None, machine, "1000-0", ended(CALL, 50, "486 Busy Here", 0))
    assert record_of(first)["revision"] == 1
    notice = {"type": "recording", "call_id": CALL, "recording_url": "https://rec.example/2"}
    doc, record = apply_entry(first, LogEntry("2000-0", CALL, notice), machine, MAX_EVENTS)
    assert record is not None
    assert record["revision"] == 2
    assert record["recording_url"] == "https://rec.example/2"
    again, unchanged = apply_entry(
        doc, LogEntry("3000-0", CALL, ended(CALL, 50, "486 Busy Here", 0)), machine, MAX_EVENTS
    )
    assert unchanged is None
    assert again is not None
    assert record_of(again)["revision"] == 2


def test_new_doc_starts_empty() -> None:
    doc = new_doc(CALL)
    assert doc["status"] is None
    assert doc["journal"] == []


def journal_of(doc: Doc) -> list[tuple[str, str | None]]:
    return [(item["verdict"], item["reason"]) for item in doc["journal"]]


def test_the_providers_event_id_makes_deliveries_one_event(deliver: Deliver) -> None:
    first = event(CALL, "ringing", 100, event_id="OI175MVQ57-1", serial=1)
    retried = event(CALL, "ringing", 101, event_id="OI175MVQ57-1", serial=2)
    other = event(CALL, "ringing", 100, event_id="OI175MVQ57-2")
    doc = deliver(first, retried, other)
    assert journal_of(doc) == [
        ("accepted", None),
        ("duplicate", None),  # same event_id, whatever else differs
        ("rejected", "illegal_transition"),  # another event_id is another event
    ]


def test_the_same_recording_notice_twice_is_one_notice(deliver: Deliver) -> None:
    notice = {"call_id": CALL, "recording_url": "https://r.example/1", "end_time": 5}
    reordered = {"end_time": 5, "recording_url": "https://r.example/1", "call_id": CALL}
    doc = deliver(ended(CALL, 10, "486 Busy Here", 0), notice, reordered)
    assert journal_of(doc) == [("accepted", None), ("annotation", None), ("duplicate", None)]
    assert record_of(doc)["revision"] == 2


def test_statuses_callstate_does_not_know_are_journaled_and_change_nothing(
    deliver: Deliver,
) -> None:
    doc = deliver(
        event(CALL, "ringing", 100),
        event(CALL, "dtmf_received", 110, digit="1"),
        {"call_id": CALL, "call_status": "ended", "endCallCause": "486 Busy Here"},
        {"call_id": CALL, "dtmf": "0", "time": "1530870073736", "timeout": False},
    )
    assert journal_of(doc) == [
        ("accepted", None),
        ("ignored", "unknown_status"),
        ("ignored", "missing_timestamp"),
        ("annotation", None),
    ]
    assert doc["status"] == "ringing" and doc["timeline"] == {"ringing": 100}
    assert "digit" not in doc["fields"] and "endCallCause" not in doc["fields"]
    assert doc["fields"]["dtmf"] == "0"
    assert doc["counts"] == {
        "accepted": 1,
        "duplicate": 0,
        "rejected": 0,
        "annotation": 1,
        "ignored": 2,
    }


def test_connect_failed_is_kept_in_the_timeline_and_does_not_end_the_call(
    deliver: Deliver,
) -> None:
    doc = deliver(
        event(CALL, "ringing", 100),
        event(CALL, "connect_failed", 110, agent_status="ended"),
        event(CALL, "answered", 120),
        ended(CALL, 200, "USER_END_CALL", 60),
    )
    assert journal_of(doc) == [
        ("accepted", None),
        ("annotation", "connect_failed"),
        ("accepted", None),
        ("accepted", None),
    ]
    assert record_of(doc)["timeline"] == {
        "ringing": 100,
        "connect_failed": 110,
        "answered": 120,
        "ended": 200,
    }
    assert record_of(doc)["agent_status"] == "ended"


def test_the_second_ivr_leg_is_not_an_illegal_transition(deliver: Deliver) -> None:
    leg = {"a": {"actor": "agent-a"}, "b": {"actor": "agent-b"}}
    doc = deliver(
        event(CALL, "ringing", 100, **leg["a"]),
        event(CALL, "ringing", 101, **leg["b"]),
        event(CALL, "answered", 110, **leg["a"]),
        event(CALL, "answered", 111, **leg["b"]),
        ended(CALL, 200, "USER_END_CALL", 60, **leg["a"]),
        ended(CALL, 201, "USER_END_CALL", 60, **leg["b"]),
    )
    assert journal_of(doc) == [
        ("accepted", None),
        ("duplicate", "other_leg"),
        ("accepted", None),
        ("duplicate", "other_leg"),
        ("accepted", None),
        ("duplicate", "other_leg"),
    ]
    assert doc["counts"]["rejected"] == 0 and record_of(doc)["revision"] == 1


def test_project_id_as_a_numeric_string_is_stored_as_the_integer(deliver: Deliver) -> None:
    doc = deliver(ended(CALL, 10, "486 Busy Here", 0, project_id="1237100"))
    assert doc["fields"]["project_id"] == 1237100
    assert record_of(doc)["project_id"] == 1237100


@pytest.mark.parametrize(
    ("cause", "disposition", "code"),
    [
        ("486 Busy Here", "busy", 486),
        ("486", "busy", 486),
        ("480 Temporarily Unavailable", "no_answer", 480),
        ("CAN_NOT_MAKE_CALL", "failed", None),
        ("MAX_CONNECT_TIME", "no_answer", None),
    ],
)
def test_end_causes_in_either_form_and_missing_durations(
    deliver: Deliver, cause: str, disposition: str, code: int | None
) -> None:
    payload = ended(CALL, 10, cause, 0)
    del payload["duration"], payload["answerDuration"]
    doc = deliver(event(CALL, "ringing", 5), payload)
    record = record_of(doc)
    assert (record["disposition"], record["sip_code"]) == (disposition, code)
    assert record["duration"] is None and record["answerDuration"] is None


def test_an_ivr_leg_with_an_empty_actor_and_a_call_centers_next_agent(deliver: Deliver) -> None:
    doc = deliver(
        event(CALL, "ringing", 100, actor=""),
        event(CALL, "ringing", 101, actor="agent-a"),
        event(CALL, "answered", 110, actor="agent-a"),
        event(CALL, "answered", 111, actor=""),
    )
    assert journal_of(doc) == [
        ("accepted", None),
        ("duplicate", "other_leg"),
        ("accepted", None),
        ("duplicate", "other_leg"),
    ]
    other = "call-vn-1-TEST-2"
    agents = deliver(
        event(other, "ringing", 100, actor="agent-1", to=to_agent("agent-1")),
        event(other, "agentEnded", 105, actor="agent-1", to=to_agent("agent-1")),
        event(other, "ringing", 110, actor="agent-2", to=to_agent("agent-2")),
        event(other, "answered", 115, actor="agent-2", to=to_agent("agent-2")),
    )
    assert [verdict for verdict, _ in journal_of(agents)] == ["accepted"] * 4
    assert [leg["to_number"] for leg in agents["legs"]] == ["agent-1", "agent-2"]


def test_an_unknown_status_cannot_pass_for_an_event_id(deliver: Deliver) -> None:
    doc = deliver(
        event(CALL, "id", 5),
        event(CALL, "ringing", 10, event_id="5"),
    )
    assert journal_of(doc) == [("ignored", "unknown_status"), ("accepted", None)]
