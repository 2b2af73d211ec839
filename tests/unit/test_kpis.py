"""Call figures (callstate/kpis.py) against values computed by hand from a known set of calls,
each made by the real pipeline (logged, drained, its record built), and properties of any set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st

from callstate import history_api
from callstate.calldoc import Record
from callstate.calls import Doc
from callstate.drain import Drainer
from callstate.kpis import GROUPINGS, call_kpis
from callstate.record import DISPOSITIONS, record_end_ms
from callstate.store import Store
from tests.factories import ended, event, record_of

DAY_1 = 1_795_856_400_000  # 2026-11-28T09:00:00Z
DAY_2 = DAY_1 + 23 * 3_600_000  # 2026-11-29T08:00:00Z
HOUR = 3_600_000
MINUTE = 60_000
INBOUND = {"callCreatedReason": "EXTERNAL_CALL_IN"}


def answered_call(
    call_id: str,
    user: str | None,
    at: int,
    ring_ms: int,
    talk_ms: int,
    answer_duration: int | None,
    **extra: Any,
) -> list[dict[str, Any]]:
    """ringing, answered `ring_ms` later, ended `talk_ms` after that; without duration fields
    at all when `answer_duration` is None (as some real bodies come)."""
    who = {"request_from_user_id": user, **extra}
    end = ended(call_id, at + ring_ms + talk_ms, "USER_END_CALL", 0, **who)
    del end["answerDuration"], end["duration"]
    if answer_duration is not None:
        end |= {"answerDuration": answer_duration, "duration": answer_duration}
    return [
        event(call_id, "ringing", at, **who),
        event(call_id, "answered", at + ring_ms, **who),
        end,
    ]


def unanswered_call(
    call_id: str, user: str | None, at: int, lasted_ms: int, cause: str, **extra: Any
) -> list[dict[str, Any]]:
    who = {"request_from_user_id": user, **extra}
    return [event(call_id, "ringing", at, **who), ended(call_id, at + lasted_ms, cause, 0, **who)]


# Thirteen calls over four UTC hours of two days: k-05 has no answerDuration (talk time from the
# timeline: 45 s), k-08 was answered without ringing (no ring time), k-12 was answered and then
# closed by the sweeper (no talk time known; it ends at its last timeline point, the answer).
KNOWN_CALLS = [
    # 2026-11-28, 09h
    answered_call("k-01", "alice", DAY_1, 5_000, 60_000, 60),
    answered_call("k-02", "alice", DAY_1 + 10 * MINUTE, 3_000, 30_000, 30),
    unanswered_call("k-03", "alice", DAY_1 + 20 * MINUTE, 20_000, "486 Busy Here"),
    # 2026-11-28, 10h
    answered_call("k-04", "bob", DAY_1 + HOUR, 10_000, 120_000, 120, **INBOUND),
    answered_call("k-05", "", DAY_1 + HOUR + 5 * MINUTE, 7_000, 45_000, None, **INBOUND),
    unanswered_call(
        "k-06", "bob", DAY_1 + HOUR + 30 * MINUTE, 30_000, "480 Temporarily Unavailable", **INBOUND
    ),
    [
        event("k-07", "created", DAY_1 + HOUR + 40 * MINUTE, request_from_user_id="alice"),
        ended(
            "k-07",
            DAY_1 + HOUR + 40 * MINUTE + 1_000,
            "CAN_NOT_MAKE_CALL",
            0,
            request_from_user_id="alice",
        ),
    ],
    # 2026-11-29, 08h
    [
        event("k-08", "answered", DAY_2, request_from_user_id="carol"),
        ended("k-08", DAY_2 + 20_000, "USER_END_CALL", 20, request_from_user_id="carol"),
    ],
    unanswered_call("k-09", "carol", DAY_2 + MINUTE, 15_000, "603 Decline"),
    unanswered_call("k-10", "carol", DAY_2 + 2 * MINUTE, 40_000, "MAX_CONNECT_TIME"),
    unanswered_call("k-11", None, DAY_2 + 3 * MINUTE, 8_000, "USER_END_CALL"),
    # 2026-11-29, 09h
    answered_call("k-12", "bob", DAY_2 + HOUR, 4_000, 0, None, **INBOUND)[:2],  # then swept
    unanswered_call("k-13", "carol", DAY_2 + HOUR + 10 * MINUTE, 5_000, "SOMETHING_NEW"),
]


@pytest.fixture
def known_records(deliver: Callable[..., Doc], store: Store, drainer: Drainer) -> list[Record]:
    """The records of KNOWN_CALLS, as the drainer built them."""
    for payloads in KNOWN_CALLS:
        deliver(*payloads)
    _, shard, _ = store.log.append_sweep("k-12", store.log.server_time_ms() + 1)
    drainer.drain(shard)
    return [record_of(store.docs.get_doc(f"k-{n:02}")) for n in range(1, 14)]


@pytest.mark.parametrize(
    ("timeline", "end"),
    [
        ({"ringing": 5, "ended": 9, "connect_failed": 12}, 9),  # `ended`, whatever came later
        ({"ringing": 5, "answered": 7}, 7),  # closed by the sweeper: its latest point
        ({}, None),
    ],
)
def test_a_record_ends_at_its_ended_else_its_latest_point(
    timeline: dict[str, int], end: int | None
) -> None:
    assert record_end_ms({"timeline": timeline}) == end


def dispositions(**counts: int) -> dict[str, int]:
    return dict.fromkeys(DISPOSITIONS, 0) | counts


def test_the_known_calls_are_what_the_figures_assume(known_records: list[Record]) -> None:
    by_id = {record["call_id"]: record for record in known_records}
    assert [by_id[f"k-{n:02}"]["disposition"] for n in range(1, 14)] == [
        "answered", "answered", "busy", "answered", "answered", "no_answer", "failed",
        "answered", "busy", "no_answer", "cancelled", "answered", "unknown",
    ]  # fmt: skip
    assert by_id["k-12"]["closed_by"] == "sweeper"
    assert record_end_ms(by_id["k-12"]) == DAY_2 + HOUR + 4_000  # its answer: no `ended`
    assert record_end_ms(by_id["k-13"]) == DAY_2 + HOUR + 10 * MINUTE + 5_000


def test_total_figures(known_records: list[Record]) -> None:
    assert call_kpis(known_records, None) == {
        "group_by": None,
        "total": {
            "calls": 13,
            "answered": 6,  # k-01, k-02, k-04, k-05, k-08, k-12
            "asr": 0.4615,  # 6 / 13 = 0.461538…
            "acd_seconds": 55.0,  # (60 + 30 + 120 + 45 + 20) / 5; k-12's talk time is unknown
            "mean_ring_seconds": 5.8,  # (5 + 3 + 10 + 7 + 4) / 5; k-08 never rang
            "talk_seconds": 275.0,  # 60 + 30 + 120 + 45 + 20
            "dispositions": dispositions(
                answered=6, busy=2, no_answer=2, cancelled=1, failed=1, unknown=1
            ),
        },
        "groups": [],
    }


def test_figures_by_hour(known_records: list[Record]) -> None:
    assert call_kpis(known_records, "hour")["groups"] == [
        {
            "key": "2026-11-28T09:00:00Z",  # k-01, k-02, k-03
            "calls": 3,
            "answered": 2,
            "asr": 0.6667,  # 2 / 3
            "acd_seconds": 45.0,  # (60 + 30) / 2
            "mean_ring_seconds": 4.0,  # (5 + 3) / 2
            "talk_seconds": 90.0,
            "dispositions": dispositions(answered=2, busy=1),
        },
        {
            "key": "2026-11-28T10:00:00Z",  # k-04 … k-07
            "calls": 4,
            "answered": 2,
            "asr": 0.5,  # 2 / 4
            "acd_seconds": 82.5,  # (120 + 45) / 2
            "mean_ring_seconds": 8.5,  # (10 + 7) / 2
            "talk_seconds": 165.0,
            "dispositions": dispositions(answered=2, no_answer=1, failed=1),
        },
        {
            "key": "2026-11-29T08:00:00Z",  # k-08 … k-11
            "calls": 4,
            "answered": 1,
            "asr": 0.25,  # 1 / 4
            "acd_seconds": 20.0,  # 20 / 1
            "mean_ring_seconds": None,  # its one answered call (k-08) never rang
            "talk_seconds": 20.0,
            "dispositions": dispositions(answered=1, busy=1, no_answer=1, cancelled=1),
        },
        {
            "key": "2026-11-29T09:00:00Z",  # k-12, k-13
            "calls": 2,
            "answered": 1,
            "asr": 0.5,  # 1 / 2
            "acd_seconds": None,  # its one answered call (k-12) has no talk time
            "mean_ring_seconds": 4.0,  # 4 / 1
            "talk_seconds": 0.0,
            "dispositions": dispositions(answered=1, unknown=1),
        },
    ]


def test_figures_by_day(known_records: list[Record]) -> None:
    assert call_kpis(known_records, "day")["groups"] == [
        {
            "key": "2026-11-28",  # k-01 … k-07
            "calls": 7,
            "answered": 4,
            "asr": 0.5714,  # 4 / 7 = 0.571428…
            "acd_seconds": 63.75,  # (60 + 30 + 120 + 45) / 4
            "mean_ring_seconds": 6.25,  # (5 + 3 + 10 + 7) / 4
            "talk_seconds": 255.0,
            "dispositions": dispositions(answered=4, busy=1, no_answer=1, failed=1),
        },
        {
            "key": "2026-11-29",  # k-08 … k-13
            "calls": 6,
            "answered": 2,
            "asr": 0.3333,  # 2 / 6
            "acd_seconds": 20.0,  # k-08's 20 / 1 (k-12 unknown)
            "mean_ring_seconds": 4.0,  # k-12's 4 / 1 (k-08 never rang)
            "talk_seconds": 20.0,
            "dispositions": dispositions(answered=2, busy=1, no_answer=1, cancelled=1, unknown=1),
        },
    ]


def test_figures_by_direction(known_records: list[Record]) -> None:
    assert call_kpis(known_records, "direction")["groups"] == [
        {
            "key": "inbound",  # k-04, k-05, k-06, k-12
            "calls": 4,
            "answered": 3,
            "asr": 0.75,  # 3 / 4
            "acd_seconds": 82.5,  # (120 + 45) / 2
            "mean_ring_seconds": 7.0,  # (10 + 7 + 4) / 3
            "talk_seconds": 165.0,
            "dispositions": dispositions(answered=3, no_answer=1),
        },
        {
            "key": "outbound",  # the other nine
            "calls": 9,
            "answered": 3,
            "asr": 0.3333,  # 3 / 9
            "acd_seconds": 36.667,  # (60 + 30 + 20) / 3 = 36.666…
            "mean_ring_seconds": 4.0,  # (5 + 3) / 2
            "talk_seconds": 110.0,
            "dispositions": dispositions(
                answered=3, busy=2, no_answer=1, cancelled=1, failed=1, unknown=1
            ),
        },
    ]


def test_figures_by_user_with_no_user_as_the_last_group(known_records: list[Record]) -> None:
    assert call_kpis(known_records, "user")["groups"] == [
        {
            "key": "alice",  # k-01, k-02, k-03, k-07
            "calls": 4,
            "answered": 2,
            "asr": 0.5,
            "acd_seconds": 45.0,  # (60 + 30) / 2
            "mean_ring_seconds": 4.0,  # (5 + 3) / 2
            "talk_seconds": 90.0,
            "dispositions": dispositions(answered=2, busy=1, failed=1),
        },
        {
            "key": "bob",  # k-04, k-06, k-12
            "calls": 3,
            "answered": 2,
            "asr": 0.6667,  # 2 / 3
            "acd_seconds": 120.0,  # k-04's 120 / 1 (k-12 unknown)
            "mean_ring_seconds": 7.0,  # (10 + 4) / 2
            "talk_seconds": 120.0,
            "dispositions": dispositions(answered=2, no_answer=1),
        },
        {
            "key": "carol",  # k-08, k-09, k-10, k-13
            "calls": 4,
            "answered": 1,
            "asr": 0.25,
            "acd_seconds": 20.0,
            "mean_ring_seconds": None,  # k-08 never rang
            "talk_seconds": 20.0,
            "dispositions": dispositions(answered=1, busy=1, no_answer=1, unknown=1),
        },
        {
            "key": None,  # k-05 (empty user) and k-11 (null user)
            "calls": 2,
            "answered": 1,
            "asr": 0.5,
            "acd_seconds": 45.0,  # k-05's timeline: ended - answered
            "mean_ring_seconds": 7.0,
            "talk_seconds": 45.0,
            "dispositions": dispositions(answered=1, cancelled=1),
        },
    ]


def test_no_records_give_zero_counts_and_null_ratios() -> None:
    assert call_kpis([], "day") == {
        "group_by": "day",
        "total": {
            "calls": 0,
            "answered": 0,
            "asr": None,
            "acd_seconds": None,
            "mean_ring_seconds": None,
            "talk_seconds": 0.0,
            "dispositions": dispositions(),
        },
        "groups": [],
    }


def test_an_unknown_grouping_is_refused() -> None:
    with pytest.raises(ValueError, match="group_by must be one of hour, day, direction, user"):
        call_kpis([], "week")


def test_records_are_read_once_as_they_come() -> None:
    """A generator (a history reader's stream) is enough: nothing is held but the sums."""
    records = ({"disposition": "busy", "direction": "outbound", "timeline": {}} for _ in range(3))
    assert call_kpis(records, "direction")["groups"][0]["calls"] == 3


TIMELINE = st.dictionaries(
    st.sampled_from(["ringing", "answered", "ended"]),
    st.integers(min_value=0, max_value=2 * 10**12),
)
RECORDS = st.lists(
    st.fixed_dictionaries(
        {
            "disposition": st.sampled_from(DISPOSITIONS),
            "direction": st.sampled_from(["inbound", "outbound"]),
            "request_from_user_id": st.sampled_from([None, "", "alice", "bob"]),
            "answerDuration": st.none() | st.integers(min_value=0, max_value=86_400),
            "timeline": TIMELINE,
        }
    ),
    max_size=30,
)


@given(records=RECORDS, group_by=st.sampled_from(GROUPINGS))
def test_groups_add_up_to_the_total(records: list[Record], group_by: str) -> None:
    figures = call_kpis(records, group_by)
    total, groups = figures["total"], figures["groups"]
    assert sum(group["calls"] for group in groups) == total["calls"] == len(records)
    assert sum(group["answered"] for group in groups) == total["answered"]
    for name in DISPOSITIONS:
        assert sum(group["dispositions"][name] for group in groups) == total["dispositions"][name]
    assert sum(total["dispositions"].values()) == total["calls"]
    keys = [group["key"] for group in groups]
    assert len(set(keys)) == len(keys) and None not in keys[:-1]


@given(records=RECORDS, group_by=st.sampled_from([None, *GROUPINGS]))
def test_ratios_are_bounded_and_null_only_without_a_denominator(
    records: list[Record], group_by: str | None
) -> None:
    figures = call_kpis(records, group_by)
    for figure in [figures["total"], *figures["groups"]]:
        assert (figure["asr"] is None) == (figure["calls"] == 0)
        assert figure["asr"] is None or 0 <= figure["asr"] <= 1
        assert figure["answered"] <= figure["calls"]
        for mean in ("acd_seconds", "mean_ring_seconds"):
            assert figure[mean] is None or figure[mean] >= 0
            if figure["answered"] == 0:
                assert figure[mean] is None


def figures_over_http(client: FlaskClient, query: str) -> dict[str, Any]:
    answer = client.get(f"/stats/calls?{query}")
    assert answer.status_code == 200, answer.get_json()
    return cast(dict[str, Any], answer.get_json())


def test_the_endpoint_sums_up_the_history_in_its_window(
    known_records: list[Record], client: FlaskClient
) -> None:
    everything = figures_over_http(client, f"since={DAY_1}&until={DAY_2 + 2 * HOUR}")
    assert everything["total"] == call_kpis(known_records)["total"]
    second_day = figures_over_http(client, f"since={DAY_2}&group_by=direction")
    assert second_day["total"] == {
        "calls": 6,  # k-08 … k-13
        "answered": 2,  # k-08, k-12
        "asr": 0.3333,  # 2 / 6
        "acd_seconds": 20.0,  # k-08's 20 s; k-12's talk time is unknown
        "mean_ring_seconds": 4.0,  # k-12's 4 s; k-08 never rang
        "talk_seconds": 20.0,
        "dispositions": dispositions(answered=2, busy=1, no_answer=1, cancelled=1, unknown=1),
    }
    assert [(group["key"], group["calls"]) for group in second_day["groups"]] == [
        ("inbound", 1),  # k-12
        ("outbound", 5),
    ]


def test_the_endpoint_defaults_to_the_last_day(
    known_records: list[Record], client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history_api, "_now_ms", lambda: DAY_2 + 2 * HOUR)
    figures = figures_over_http(client, "")  # from DAY_1 + 1 h: k-04 … k-13
    assert figures["since"] == "2026-11-28T10:00:00.000Z"
    assert figures["total"] == {
        "calls": 10,
        "answered": 4,  # k-04, k-05, k-08, k-12
        "asr": 0.4,  # 4 / 10
        "acd_seconds": 61.667,  # (120 + 45 + 20) / 3
        "mean_ring_seconds": 7.0,  # (10 + 7 + 4) / 3
        "talk_seconds": 185.0,
        "dispositions": dispositions(
            answered=4, no_answer=2, failed=1, busy=1, cancelled=1, unknown=1
        ),
    }


@pytest.mark.parametrize(
    ("query", "field"),
    [("group_by=week", "group_by"), ("since=yesterday", "since"), ("since=9&until=3", "until")],
)
def test_the_endpoint_refuses_a_bad_parameter(client: FlaskClient, query: str, field: str) -> None:
    answer = client.get(f"/stats/calls?{query}")
    assert answer.status_code == 400
    assert answer.get_json()["field"] == field


def test_the_endpoint_refuses_a_window_too_wide_to_read_in_a_request(
    known_records: list[Record], client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history_api, "MAX_FIGURES_RECORDS", 12)
    answer = client.get(f"/stats/calls?since={DAY_1}")
    assert answer.status_code == 400
    assert answer.get_json()["field"] == "since"
    assert figures_over_http(client, f"since={DAY_1 + HOUR}")["total"]["calls"] == 10
