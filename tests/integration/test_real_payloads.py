"""Every body other teams' integrations received or typed (tests/data/real-payloads.json, a copy
of the corpus in shared/stringee, with its sources), through the real app, Redis and workers.

What each must get is written here from the provider's documentation, not from callstate's
output: a body that names a call is stored and journaled; one that does not is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from tests.factories import DATA
from tests.integration.stack import Stack, wait_until

MakeStack = Callable[..., Stack]
REPLAYED_KINDS = ("doc example", "logged payload", "test fixture")
CORPUS: list[dict[str, Any]] = json.loads((DATA / "real-payloads.json").read_text())

# Index in the corpus -> (HTTP status, the call's journal after it, what its record must show).
EXPECTED: dict[int, tuple[int, list[tuple[str, str | None]], dict[str, Any] | None]] = {
    # The documented `started` event: a call in progress.
    0: (200, [("accepted", None)], None),
    # The documented `ended` event: 486 is busy, CLIENT_MAKE_CALL is outbound.
    1: (
        200,
        [("accepted", None)],
        {"disposition": "busy", "sip_code": 486, "direction": "outbound", "duration": 9},
    ),
    # Logged in production with fields the docs do not list; app-to-app: user ids as numbers.
    2: (
        200,
        [("accepted", None)],
        {
            "disposition": "busy",
            "sip_code": 486,
            "project_id": 1237100,
            "event_id": "OI175MVQ57-1708736338885",
            "from": {
                "number": "phongzann",
                "alias": "phongzann",
                "is_online": True,
                "type": "internal",
            },
        },
    ),
    # A DTMF callback: it names a call and reports no state change.
    3: (200, [("annotation", None)], None),
    # No call_id: not an event of any call.
    4: (422, [], None),
    # Partial `ended` bodies without timestamp_ms, which every documented event carries:
    # stored and journaled, but nothing can order them among the call's events.
    5: (200, [("ignored", "missing_timestamp")], None),
    6: (200, [("ignored", "missing_timestamp")] * 2, None),
    7: (200, [("ignored", "missing_timestamp")], None),
    8: (200, [("ignored", "missing_timestamp")], None),
}


def test_the_expectations_cover_every_replayed_body() -> None:
    replayed = [n for n, item in enumerate(CORPUS) if item["kind"].startswith(REPLAYED_KINDS)]
    assert replayed == sorted(EXPECTED)


@pytest.fixture
def stack(make_stack: MakeStack) -> Stack:
    stack = make_stack()
    stack.start_web()
    stack.start_workers(2)
    return stack


def journal(stack: Stack, call_id: str) -> list[tuple[str, str | None]]:
    answer = stack.get(f"/calls/{call_id}/events")
    if not answer.ok:
        return []
    return [(e["verdict"], e["reason"]) for e in answer.json()["events"]]


def has_journal(stack: Stack, call_id: str, expected: list[tuple[str, str | None]]) -> bool:
    return journal(stack, call_id) == expected


def test_every_real_body_gets_its_documented_verdict_and_record(stack: Stack) -> None:
    for index, (status, expected_journal, expected_record) in EXPECTED.items():
        payload = CORPUS[index]["payload"]
        answer = stack.post(payload)
        assert answer.status_code == status, (index, answer.json())
        call_id = payload.get("call_id")
        if status != 200:
            assert answer.json()["field"] == "call_id"
            continue
        wait_until(
            partial(has_journal, stack, call_id, expected_journal),
            20,
            f"the journal of corpus body {index}",
        )
        record = stack.get(f"/calls/{call_id}/record")
        if expected_record is None:
            assert record.status_code == 404
        else:
            shown = record.json()
            assert {name: shown[name] for name in expected_record} == expected_record
            assert shown["closed_by"] == "ended_event" and shown["revision"] == 1
    check = stack.cli("rebuild", "--check")
    assert check.returncode == 0, check.stdout
