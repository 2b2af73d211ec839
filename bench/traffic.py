"""Benchmark traffic: realistic calls with duplicates and out-of-order pairs, and what they imply.

The expectations are computed here from how the traffic was built, independently of callstate's
own code, so a run can check every call against them.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any

from callstate.calldoc import CallDoc
from tests.factories import scenario

KINDS = ("answered", "answered", "busy", "no_answer", "failed", "call_center")
DISPOSITION = {
    "answered": "answered",
    "busy": "busy",
    "no_answer": "no_answer",
    "failed": "failed",
    "call_center": "answered",
}
DUPLICATE_SHARE = 0.05
SWAP_SHARE = 0.05


@dataclass
class PlannedCall:
    """One call's deliveries, in the order they will be sent, and the state they must produce."""

    call_id: str
    sends: list[dict[str, Any]]
    expected: dict[str, Any] = field(default_factory=dict)


def plan_call(call_id: str, rng: random.Random, start_ms: int) -> PlannedCall:
    kind = rng.choice(KINDS)
    caller, callee = (f"84{rng.randrange(10**9):09d}" for _ in range(2))
    user = f"user-{rng.randrange(10**5)}"
    events = [
        _with_parties(payload, caller, callee, user)
        for payload in scenario(call_id, kind, start_ms)
    ]
    sends = list(events)
    rejected = 0
    if rng.random() < SWAP_SHARE * len(sends) / 2:
        # The first two events swapped: the later one starts the call, the earlier is out of order.
        sends[0], sends[1] = sends[1], sends[0]
        rejected = 1
    duplicates = 0
    if rng.random() < DUPLICATE_SHARE * len(sends):
        position = rng.randrange(len(sends))
        sends.insert(rng.randrange(position + 1, len(sends) + 1), copy.deepcopy(sends[position]))
        duplicates = 1
    timeline: dict[str, int] = {}
    for payload in events:
        timeline.setdefault(payload["call_status"], payload["timestamp_ms"])
    expected = {
        "status": "ended",
        "timeline": timeline,
        "counts": {
            "accepted": len(events) - rejected,
            "duplicate": duplicates,
            "rejected": rejected,
            "annotation": 0,
        },
        "disposition": DISPOSITION[kind],
        # An end delivered before an earlier status: that status then fills the timeline after
        # the end, which revises the record once.
        "revision": 2 if rejected and sends[0]["call_status"] == "ended" else 1,
    }
    return PlannedCall(call_id, sends, expected)


def _with_parties(payload: dict[str, Any], caller: str, callee: str, user: str) -> dict[str, Any]:
    """Give each call its own numbers and user, as real traffic has (agents' legs keep theirs)."""
    payload["from"] = payload["from"] | {"number": caller, "alias": caller}
    if not str(payload["to"]["number"]).startswith("agent-"):
        payload["to"] = payload["to"] | {"number": callee, "alias": callee}
    payload["request_from_user_id"] = user
    return payload


def check_call(planned: PlannedCall, doc: CallDoc | None, acked: list[str]) -> list[str]:
    """What differs between a stored call and its plan: state, record, and its journal's ids."""
    if doc is None:
        return [f"{planned.call_id}: missing"]
    problems = []
    record = doc.get("record") or {}
    found = {
        "status": doc["status"],
        "timeline": doc["timeline"],
        "counts": doc["counts"],
        "disposition": record.get("disposition"),
        "revision": record.get("revision"),
    }
    for name, value in planned.expected.items():
        if found[name] != value:
            problems.append(f"{planned.call_id}: {name} {found[name]!r} != {value!r}")
    journal_ids = [item["log_id"] for item in doc["journal"]]
    if journal_ids != acked:
        problems.append(f"{planned.call_id}: journal ids differ from the acknowledged ones")
    return problems
