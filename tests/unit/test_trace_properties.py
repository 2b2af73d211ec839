"""Property: whatever the provider does to a call's events, the stored state matches a model.

Realistic traces (tests/factories.py scenarios, recording notices) are dropped, duplicated,
delayed and interleaved across calls, then logged and drained through the real path on
fakeredis. The expected state comes from the reference model below, which restates README
sections 4-6 (transition table, verdicts, timeline, fields, legs, disposition, revisions) and
deliberately calls nothing from callstate.calls, callstate.record or callstate.machine.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callstate.config import Settings
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.rebuild import check
from callstate.store import Store
from tests.factories import SCENARIOS, body, published, scenario

# --- The reference model ----------------------------------------------------------------------

# README section 4: allowed next statuses; a call with no accepted event yet accepts any status.
ALLOWED: dict[str, frozenset[str]] = {
    "created": frozenset({"started", "ringing", "answered", "agentEnded", "ended"}),
    "started": frozenset({"ringing", "answered", "agentEnded", "ended"}),
    "ringing": frozenset({"answered", "agentEnded", "ended"}),
    "answered": frozenset({"agentEnded", "ended"}),
    "agentEnded": frozenset({"ringing", "answered", "ended"}),
    "ended": frozenset(),
}
# Payload keys that identify an event rather than describe the call: never stored as fields.
IDENTITY = frozenset({"call_id", "call_status", "timestamp_ms"})


def model_sip_code(cause: Any) -> int | None:
    """The leading status code of a SIP status line such as `486 Busy Here`."""
    if not isinstance(cause, str):
        return None
    head = cause.strip().split(" ", 1)[0]
    if len(head) == 3 and head.isdigit() and "1" <= head[0] <= "6":
        return int(head)
    return None


def model_disposition(fields: dict[str, Any], timeline: dict[str, int]) -> str:
    """README section 6, plus record.py's rule for an `ended` without `answerDuration` (seen in
    production, FACTS.md): then an `answered` in the timeline counts as answered."""
    answer = fields.get("answerDuration")
    if isinstance(answer, int) and not isinstance(answer, bool) and answer > 0:
        return "answered"
    if answer is None and "answered" in timeline:
        return "answered"
    cause = fields.get("endCallCause")
    code = model_sip_code(cause)
    if code in (486, 600, 603):
        return "busy"
    if code in (408, 480) or cause == "MAX_CONNECT_TIME":
        return "no_answer"
    if code == 487:
        return "cancelled"
    if cause == "CAN_NOT_MAKE_CALL" or (code is not None and code >= 400):
        return "failed"
    if cause == "USER_END_CALL":
        return "cancelled"
    return "unknown"


@dataclass
class ModelLeg:
    """One agent's attempt: opened by an accepted ringing (or an answer with no open leg)."""

    to_number: str | None
    user: str | None
    ringing_ms: int | None
    answered_ms: int | None = None
    ended_ms: int | None = None


@dataclass
class ModelCall:
    call_id: str
    exists: bool = False
    status: str | None = None
    last_accepted_ms: int | None = None
    seen: set[tuple[str, int]] = field(default_factory=set)
    notices: set[str] = field(default_factory=set)
    fields: dict[str, Any] = field(default_factory=dict)
    timeline: dict[str, int] = field(default_factory=dict)
    legs: list[ModelLeg] = field(default_factory=list)
    closed_by: str | None = None
    counts: Counter[str] = field(default_factory=Counter)
    journal: list[tuple[str, str | None, str | None, int | None]] = field(default_factory=list)
    deliveries: int = 0
    revision: int = 0
    revised_from: Any = None  # what the last revision showed, counts aside
    record_counts: dict[str, int] = field(default_factory=dict)

    def deliver(self, payload: dict[str, Any]) -> None:
        self.exists = True
        self.deliveries += 1
        if "call_status" not in payload and "recording_url" in payload:
            # A recording notice: the same notice again is one notice; otherwise its fields win,
            # except its `type` ("recording").
            notice = json.dumps(payload, sort_keys=True)
            if notice in self.notices:
                self._journal(payload, "duplicate", None)
            else:
                self.notices.add(notice)
                self._merge(payload, override=True, keep=frozenset({"type"}))
                self._journal(payload, "annotation", None)
        else:
            self._event(payload)
        self._revise()

    def _event(self, payload: dict[str, Any]) -> None:
        status: str = payload["call_status"]
        ts: int = payload["timestamp_ms"]
        if (status, ts) in self.seen:
            self._journal(payload, "duplicate", None)
            return
        self.seen.add((status, ts))
        if self.last_accepted_ms is not None and ts < self.last_accepted_ms:
            reason: str | None = "out_of_order"
        elif self.status == "ended":
            reason = "after_end"
        elif self.status is not None and status not in ALLOWED[self.status]:
            reason = "illegal_transition"
        else:
            reason = None
        if status not in self.timeline:
            self.timeline[status] = ts
        if reason is not None:
            self._merge(payload, override=False)
            self._journal(payload, "rejected", reason)
            return
        self.status = status
        self.last_accepted_ms = ts
        self._merge(payload, override=True)
        self._move_legs(status, ts, payload)
        if status == "ended":
            self.closed_by = "ended_event"
        self._journal(payload, "accepted", None)

    def _move_legs(self, status: str, ts: int, payload: dict[str, Any]) -> None:
        open_leg = self.legs[-1] if self.legs and self.legs[-1].ended_ms is None else None
        to = payload.get("to") or {}
        if status == "ringing" and open_leg is None:
            self.legs.append(ModelLeg(to.get("number"), payload.get("request_from_user_id"), ts))
        elif status == "answered":
            if open_leg is None:
                open_leg = ModelLeg(to.get("number"), payload.get("request_from_user_id"), None)
                self.legs.append(open_leg)
            open_leg.answered_ms = ts
        elif status in ("agentEnded", "ended") and open_leg is not None:
            open_leg.ended_ms = ts

    def _merge(
        self, payload: dict[str, Any], *, override: bool, keep: frozenset[str] = frozenset()
    ) -> None:
        for name, value in payload.items():
            if name in IDENTITY or name in keep:
                continue
            if override or name not in self.fields:
                self.fields[name] = copy.deepcopy(value)

    def _journal(self, payload: dict[str, Any], verdict: str, reason: str | None) -> None:
        self.counts[verdict] += 1
        self.journal.append(
            (verdict, reason, payload.get("call_status"), payload.get("timestamp_ms"))
        )

    def _revise(self) -> None:
        """An ended call has a record; a new revision whenever it changes, counts aside."""
        if self.status != "ended":
            return
        shown = copy.deepcopy(
            (self.fields, self.timeline, self.record_legs(), self.closed_by, self.direction())
        )
        if self.revision == 0 or shown != self.revised_from:
            self.revision += 1
            self.revised_from = shown
            self.record_counts = self.count_dict()

    def count_dict(self) -> dict[str, int]:
        return {v: self.counts[v] for v in ("accepted", "duplicate", "rejected", "annotation")}

    def direction(self) -> str:
        return (
            "inbound" if self.fields.get("callCreatedReason") == "EXTERNAL_CALL_IN" else "outbound"
        )

    def record_legs(self) -> list[dict[str, Any]]:
        inbound = self.direction() == "inbound"
        legs = []
        for leg in self.legs:
            agent = (leg.to_number or leg.user) if inbound else (leg.user or leg.to_number)
            if leg.answered_ms is not None:
                outcome = "answered"
            elif leg.ended_ms is not None:
                outcome = "missed"
            else:
                outcome = "unknown"
            legs.append(
                {
                    "agent": agent,
                    "ringing_ms": leg.ringing_ms,
                    "answered_ms": leg.answered_ms,
                    "ended_ms": leg.ended_ms,
                    "outcome": outcome,
                }
            )
        return legs


# --- Traces -----------------------------------------------------------------------------------

BASE_MS = 1_515_859_261_381
# How many times the provider delivers an event: mostly once; 0 is a drop. Shrinks to 1.
COPIES = st.sampled_from([1, 1, 1, 1, 1, 1, 0, 0, 2, 2, 3])
# Delay of a delivery, in quarter positions of its call's trace: small reorderings, sometimes far.
DELAYS = st.sampled_from([0, 0, 0, 0, 1, 2, 3, 5, 7, 11, 20, 40])
# Milliseconds between consecutive events of a call: 0 gives equal timestamps.
GAPS = st.sampled_from([1, 1, 1, 0, 0, 2, 250, 5000])
# Other end causes the provider reports, for the kinds that were not answered.
CAUSES = st.sampled_from(
    [
        None,  # the scenario's own
        "603 Decline",
        "600 Busy Everywhere",
        "408 Request Timeout",
        "MAX_CONNECT_TIME",
        "487 Request Terminated",
        "404 Not Found",
        "503 Service Unavailable",
        "USER_END_CALL",
        "200 OK",
        "NORMAL_CLEARING",
    ]
)


@dataclass(frozen=True)
class Delivery:
    call_id: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Trace:
    call_ids: list[str]
    deliveries: list[Delivery]
    drain_points: frozenset[int]
    batch: int
    rebuild_batch: int


def call_events(draw: st.DrawFn, call_id: str, kind: str) -> list[dict[str, Any]]:
    """One call's events in the provider's order, with retimed and varied end events."""
    events = scenario(call_id, kind, BASE_MS + draw(st.integers(0, 30)) * 1000)
    ts = events[0]["timestamp_ms"]
    for payload in events[1:]:
        ts += draw(GAPS)
        payload["timestamp_ms"] = ts
    end = events[-1]
    if kind not in ("answered", "call_center"):
        cause = draw(CAUSES)
        if cause is not None:
            end["endCallCause"] = cause
    if draw(st.sampled_from([False, False, False, False, True])):
        # Some bodies have no duration fields at all (FACTS.md, reported 2026-06).
        del end["duration"], end["answerDuration"]
    return events


def recording_notice(draw: st.DrawFn, call_id: str, n: int, end_ms: int) -> dict[str, Any]:
    notice: dict[str, Any] = {
        "type": "recording",
        "call_id": call_id,
        "recording_url": f"https://api.stringee.com/v1/call/play/{call_id}-{n}.mp3",
        "start_time": end_ms - 40_000,
        "end_time": end_ms,
    }
    if draw(st.booleans()):
        notice["timestamp_ms"] = end_ms + draw(st.integers(-1, 3))
    return notice


@st.composite
def traces(draw: st.DrawFn) -> Trace:
    keyed: list[tuple[int, int, Delivery]] = []
    call_ids: list[str] = []
    for index in range(draw(st.integers(1, 4))):
        # The suffix varies which calls share a shard (crc32 of the id).
        call_id = f"call-vn-1-TRACE{index}-{1515820305470 + draw(st.integers(0, 9))}"
        call_ids.append(call_id)
        events = call_events(draw, call_id, draw(st.sampled_from(SCENARIOS)))
        nominal: list[tuple[float, dict[str, Any]]] = [(n, e) for n, e in enumerate(events)]
        end_pos = len(events) - 1
        for n in range(draw(st.integers(0, 2))):
            # Recording notices race the ended event.
            notice = recording_notice(draw, call_id, n, events[-1]["timestamp_ms"])
            nominal.append((end_pos + draw(st.sampled_from([0.5, -0.5, 1.5, -1.5])), notice))
        offset = draw(st.integers(0, 10))
        for pos, payload in nominal:
            for _ in range(draw(COPIES)):
                key = int(4 * (offset + pos)) + draw(DELAYS)
                keyed.append((key, len(keyed), Delivery(call_id, payload)))
    keyed.sort(key=lambda item: (item[0], item[1]))
    deliveries = [delivery for _, _, delivery in keyed]
    drain_points = frozenset(
        draw(st.lists(st.integers(0, max(0, len(deliveries) - 1)), max_size=4))
    )
    batch = draw(st.sampled_from([7, 1, 2, 3, 500]))
    rebuild_batch = draw(st.sampled_from([7, 1, 4, 500]))
    return Trace(call_ids, deliveries, drain_points, batch, rebuild_batch)


# --- The property -----------------------------------------------------------------------------

MACHINE = CallMachine()


def records_of(store: Store, call_id: str) -> list[dict[str, Any]]:
    rows = published(store.redis, store.keys)
    return [json.loads(e[b"record"]) for _, e in rows if e[b"call_id"].decode() == call_id]


def check_call(store: Store, call: ModelCall, log_ids: list[str]) -> None:
    doc = store.docs.get_doc(call.call_id)
    if not call.exists:
        assert doc is None
        return
    assert doc is not None
    assert doc["status"] == call.status
    assert doc["counts"] == call.count_dict()
    assert doc["timeline"] == call.timeline
    assert doc["fields"] == call.fields
    assert doc["last_timestamp_ms"] == call.last_accepted_ms
    assert doc["version"] == call.deliveries
    journal = [
        (e["verdict"], e["reason"], e["call_status"], e["timestamp_ms"]) for e in doc["journal"]
    ]
    assert journal == call.journal
    assert [e["log_id"] for e in doc["journal"]] == log_ids
    published = records_of(store, call.call_id)
    record = doc["record"]
    if call.status != "ended":
        assert record is None
        assert published == []
        return
    assert record is not None
    assert doc["closed_by"] == "ended_event"
    assert record["disposition"] == model_disposition(call.fields, call.timeline)
    assert record["sip_code"] == model_sip_code(call.fields.get("endCallCause"))
    assert record["direction"] == call.direction()
    assert record["closed_by"] == call.closed_by
    assert record["timeline"] == call.timeline
    assert record["legs"] == call.record_legs()
    assert call.revision >= 1
    assert record["revision"] == call.revision
    assert record["counts"] == call.record_counts
    assert {name: record[name] for name in call.fields} == call.fields
    # Every revision reaches the records stream once, in order; the last is the stored one.
    assert [r["revision"] for r in published] == list(range(1, call.revision + 1))
    assert published[-1] == record


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(trace=traces())
def test_any_delivery_order_ends_in_the_state_the_model_predicts(trace: Trace) -> None:
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeRedis(server=server)
    with tempfile.TemporaryDirectory() as tmp:
        config = Settings(
            redis_url="redis://fake", embedded_redis=False, var_dir=Path(tmp), shards=4
        )
        store = Store(redis, config)
        drainer = Drainer(
            store,
            MACHINE,
            batch=trace.batch,
            slice_ms=60_000,
            linger_ms=0,
            window_ms=0,
            wake=list[int]().append,
        )
        model = {call_id: ModelCall(call_id) for call_id in trace.call_ids}
        log_ids: dict[str, list[str]] = {call_id: [] for call_id in trace.call_ids}
        for n, delivery in enumerate(trace.deliveries):
            log_id, shard, _ = store.log.append_event(delivery.call_id, body(delivery.payload))
            log_ids[delivery.call_id].append(log_id)
            model[delivery.call_id].deliver(delivery.payload)
            if n in trace.drain_points:
                drainer.drain(shard)
        for shard in range(config.shards):
            drainer.drain(shard)
            assert not store.log.has_backlog(shard)

        for call_id, call in model.items():
            check_call(store, call, log_ids[call_id])
        assert store.docs.all_call_ids() == {c for c, call in model.items() if call.exists}
        assert check(store, MACHINE, trace.rebuild_batch).differing == []
