"""Webhook in, lookup and record out, through gunicorn, Redis and real RQ worker processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from callstate.connection import StreamRows
from tests.factories import ended, event, example, to_agent
from tests.integration.stack import Stack, wait_until

MakeStack = Callable[..., Stack]


def record_of(stack: Stack, call_id: str, revision: int = 1) -> dict[str, Any] | None:
    response = stack.get(f"/calls/{call_id}/record")
    if response.status_code != 200:
        return None
    found: dict[str, Any] = response.json()
    return found if found["revision"] >= revision else None


def test_documented_events_become_state_and_a_record(make_stack: MakeStack) -> None:
    stack = make_stack()
    stack.start_web()
    stack.start_workers(2)
    started = example("started")
    call_id = started["call_id"]
    end = example("ended") | {"call_id": call_id}
    assert stack.post(started).status_code == 200
    wait_until(lambda: stack.get(f"/calls/{call_id}").ok, 20, "the started event to apply")
    live = stack.get("/calls?active=true&number=84909985668").json()
    assert [c["call_id"] for c in live["calls"]] == [call_id]
    assert stack.post(end).status_code == 200
    record = wait_until(lambda: record_of(stack, call_id), 20, "the final record")
    assert record["disposition"] == "busy"
    assert record["sip_code"] == 486
    assert record["timeline"] == {"started": 1515859261381, "ended": 1538369461077}
    assert record["clientCustomData"] == ""
    call = stack.get(f"/calls/{call_id}").json()
    assert call["status"] == "ended"
    assert call["counts"]["accepted"] == 2
    assert stack.get("/calls?active=true").json()["total"] == 0
    events = stack.get(f"/calls/{call_id}/events").json()["events"]
    assert [e["payload"] for e in events] == [started, end]

    redis = stack.redis.client()
    records = stack.keys.records(stack.keys.shard_of(call_id))  # a consumer group per shard
    redis.xgroup_create(records, "billing", id="0")
    read = cast(
        list[tuple[bytes, StreamRows]],
        redis.xreadgroup("billing", "billing-1", {records: ">"}),
    )
    assert [fields[b"call_id"].decode() for _, fields in read[0][1]] == [call_id]


def test_call_center_call_with_late_duplicate_and_recording(make_stack: MakeStack) -> None:
    stack = make_stack()
    stack.start_web()
    stack.start_workers(2)
    call = "call-center-1"
    inbound = {"callCreatedReason": "EXTERNAL_CALL_IN"}
    sent = [
        event(call, "created", 100, **inbound),
        event(call, "ringing", 110, to=to_agent("agent-1"), **inbound),
        event(call, "agentEnded", 130, to=to_agent("agent-1"), **inbound),
        event(call, "ringing", 140, to=to_agent("agent-2"), **inbound),
        event(call, "ringing", 140, to=to_agent("agent-2"), **inbound),
        event(call, "answered", 150, to=to_agent("agent-2"), **inbound),
        event(call, "started", 105, **inbound),
        ended(call, 900, "USER_END_CALL", 75, **inbound),
        {"type": "recording", "call_id": call, "recording_url": "https://rec.example/c1.mp3"},
    ]
    for payload in sent:
        assert stack.post(payload).status_code == 200
    record = wait_until(lambda: record_of(stack, call, revision=2), 20, "the revised record")
    assert record["recording_url"] == "https://rec.example/c1.mp3"
    assert record["direction"] == "inbound"
    assert record["disposition"] == "answered"
    assert [(leg["agent"], leg["outcome"]) for leg in record["legs"]] == [
        ("agent-1", "missed"),
        ("agent-2", "answered"),
    ]
    assert record["timeline"]["started"] == 105
    assert record["counts"] == {"accepted": 6, "duplicate": 1, "rejected": 1, "annotation": 1}
    verdicts = [
        (e["verdict"], e["reason"]) for e in stack.get(f"/calls/{call}/events").json()["events"]
    ]
    assert verdicts[4] == ("duplicate", None)
    assert verdicts[6] == ("rejected", "out_of_order")
    assert verdicts[8] == ("annotation", None)
