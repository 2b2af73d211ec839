"""The records history: what a commit stores, index replacement, paging over shards, filters,
retention, and the HTTP search and export."""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient
from redis import Redis

from callstate import history as history_module
from callstate import jobs
from callstate.calldoc import Record
from callstate.calls import Doc
from callstate.config import Settings
from callstate.drain import Drainer
from callstate.history import DAY_MS, TRIM_SLACK_MS, Filters, History, member
from callstate.history_api import decode_cursor, encode_cursor
from callstate.machine import CallMachine
from callstate.rebuild import rebuild
from callstate.store import Store
from callstate.web import create_app
from tests.factories import ended, event, record_of, scenario, to_agent

Deliver = Callable[..., Doc]
DAY0 = 1_764_000_000_000  # 2025-11-24


def record(call_id: str, end_ms: int, **extra: Any) -> Record:
    """A record as the commit would write it, with what the history reads."""
    found: Record = {
        "call_id": call_id,
        "revision": 1,
        "timeline": {"ringing": end_ms - 5000, "ended": end_ms},
        "from": {"number": "84899199866"},
        "to": {"number": "84909985668"},
        "request_from_user_id": "huydn",
        "disposition": "answered",
        "direction": "outbound",
        "legs": [],
    }
    found.update(extra)
    return found


def put(store: Store, *records: Record, before: dict[str, Record | None] | None = None) -> None:
    """Write records as a commit does, in one transaction."""
    with store.redis.pipeline() as pipe:
        store.history.queue_records(pipe, records, before or {})
        pipe.execute()


def ids(records: list[Record]) -> list[str]:
    return [r["call_id"] for r in records]


def all_pages(history: History, limit: int, **query: Any) -> list[list[str]]:
    pages, after = [], None
    while True:
        page = history.page(query.get("since", 0), query.get("until"), Filters(), limit, after)
        pages.append(ids(page.records))
        if page.next_after is None:
            return pages
        after = page.next_after


def history_keys(store: Store) -> set[bytes]:
    return {k for k in store.redis.scan_iter(match="cs:{s*}:history*")}


def test_a_committed_record_is_stored_with_its_indexes(deliver: Deliver, store: Store) -> None:
    doc = deliver(*scenario("h-1", "answered", DAY0))
    rec = record_of(doc)
    shard = store.keys.shard_of("h-1")
    place = member(rec)
    assert place == f"{DAY0 + 4:013d}:h-1"
    assert store.history.latest(["h-1"]) == {"h-1": rec}
    for key in (
        store.keys.history_by_end(shard),
        store.keys.history_by(shard, "number", "84899199866"),
        store.keys.history_by(shard, "number", "84909985668"),
        store.keys.history_by(shard, "user", "huydn"),
    ):
        assert store.redis.zrange(key, 0, -1, withscores=True) == [(place.encode(), 0.0)]
    packed = store.redis.hget(store.keys.history(shard), "h-1")
    assert packed is not None and len(packed) < len(json.dumps(rec)) / 3


def test_a_call_closed_by_the_sweeper_then_ended_moves_to_its_real_end(
    deliver: Deliver, store: Store, drainer: Drainer
) -> None:
    deliver(event("h-sw", "ringing", DAY0), event("h-sw", "answered", DAY0 + 1000))
    store.log.append_sweep("h-sw", store.log.server_time_ms() + 1)
    drainer.drain(store.keys.shard_of("h-sw"))
    swept = store.history.latest(["h-sw"])["h-sw"]
    assert swept is not None and swept["closed_by"] == "sweeper"
    assert member(swept) == f"{DAY0 + 1000:013d}:h-sw"  # its last timeline point
    doc = deliver(ended("h-sw", DAY0 + 60_000, "USER_END_CALL", 59))
    end_key = store.keys.history_by_end(store.keys.shard_of("h-sw"))
    assert store.redis.zrange(end_key, 0, -1) == [f"{DAY0 + 60_000:013d}:h-sw".encode()]
    assert store.history.latest(["h-sw"])["h-sw"] == record_of(doc)
    assert record_of(doc)["revision"] == 2


def test_a_revision_with_other_parties_leaves_no_stale_index_entry(store: Store) -> None:
    first = record("h-p", DAY0)
    second = record("h-p", DAY0 + 7, revision=2, to={"number": "999"}, request_from_user_id="x")
    put(store, first)
    put(store, second, before={"h-p": first})
    shard = store.keys.shard_of("h-p")
    assert not store.redis.exists(store.keys.history_by(shard, "number", "84909985668"))
    assert not store.redis.exists(store.keys.history_by(shard, "user", "huydn"))
    assert store.redis.zrange(store.keys.history_by(shard, "number", "84899199866"), 0, -1) == [
        member(second).encode()
    ]
    assert store.redis.zcard(store.keys.history_by_end(shard)) == 1


def test_a_call_numbered_on_from_a_tombstone_replaces_its_history_entries(
    deliver: Deliver, store: Store
) -> None:
    deliver(*scenario("h-ts", "busy", DAY0))
    store.redis.delete(store.keys.call("h-ts"))  # retired: only its tombstone is left
    store.redis.set(store.keys.tombstone("h-ts"), "1:0")
    again = [dict(p, to={"number": "555"}) for p in scenario("h-ts", "failed", DAY0 + 10**6)]
    doc = deliver(*again)
    assert record_of(doc)["revision"] == 2
    shard = store.keys.shard_of("h-ts")
    assert not store.redis.exists(store.keys.history_by(shard, "number", "84909985668"))
    assert store.redis.zrange(store.keys.history_by_end(shard), 0, -1) == [
        member(record_of(doc)).encode()
    ]


def test_two_revisions_in_one_batch_leave_only_the_second(store: Store) -> None:
    put(store, record("h-2", DAY0), record("h-2", DAY0 + 9, revision=2))
    assert store.redis.zcard(store.keys.history_by_end(store.keys.shard_of("h-2"))) == 1
    assert ids(store.history.page(0, None, Filters(), 10, None).records) == ["h-2"]


def test_pages_over_every_shard_are_newest_first_with_ties_by_call_id(store: Store) -> None:
    # 40 calls over the 4 shards, five at each end time: ties inside and across shards
    calls = [record(f"h-{n:02d}", DAY0 + (n // 5) * 1000) for n in range(40)]
    put(store, *calls)
    assert {store.keys.shard_of(c["call_id"]) for c in calls} == {0, 1, 2, 3}
    expected = [c["call_id"] for c in sorted(calls, key=member, reverse=True)]
    pages = all_pages(store.history, 7)
    assert [c for page in pages for c in page] == expected
    assert [len(page) for page in pages] == [7, 7, 7, 7, 7, 5]


def test_the_cursor_holds_while_new_records_and_revisions_arrive(store: Store) -> None:
    put(store, *(record(f"c-{n}", DAY0 + n) for n in range(10)))
    first = store.history.page(0, None, Filters(), 4, None)
    assert ids(first.records) == ["c-9", "c-8", "c-7", "c-6"]
    put(store, *(record(f"new-{n}", DAY0 + 100 + n) for n in range(5)))
    revised = record("c-8", DAY0 + 8, revision=2, recording_url="https://r")
    put(store, revised, before={"c-8": record("c-8", DAY0 + 8)})
    second = store.history.page(0, None, Filters(), 4, first.next_after)
    assert ids(second.records) == ["c-5", "c-4", "c-3", "c-2"]
    third = store.history.page(0, None, Filters(), 4, second.next_after)
    assert ids(third.records) == ["c-1", "c-0"]
    assert third.next_after is None


def test_filters_and_time_range(store: Store) -> None:
    put(
        store,
        record("f-a", DAY0 + 1, disposition="busy"),
        record("f-b", DAY0 + 2, direction="inbound", to={"number": "555"}),
        record("f-c", DAY0 + 3, request_from_user_id="ann"),
        record("f-d", DAY0 + 4),
    )

    def found(since: int = 0, until: int | None = None, **filters: str) -> list[str]:
        return ids(store.history.page(since, until, Filters(**filters), 50, None).records)

    assert found() == ["f-d", "f-c", "f-b", "f-a"]
    assert found(disposition="busy") == ["f-a"]
    assert found(direction="inbound") == ["f-b"]
    assert found(number="555") == ["f-b"]
    assert found(number="84909985668") == ["f-d", "f-c", "f-a"]
    assert found(user="ann") == ["f-c"]
    assert found(number="555", user="ann") == []
    assert found(since=DAY0 + 2, until=DAY0 + 4) == ["f-c", "f-b"]  # [since, until)
    assert found(direction="outbound", since=DAY0 + 2) == ["f-d", "f-c"]


def test_a_selective_filter_reads_on_until_the_page_is_full(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history_module, "WALK_STEP", 3)
    put(store, *(record(f"s-{n:02d}", DAY0 + n) for n in range(30)))
    put(store, record("s-busy-1", DAY0 + 2, disposition="busy"))
    put(store, record("s-busy-2", DAY0 + 25, disposition="busy"))
    page = store.history.page(0, None, Filters(disposition="busy"), 2, None)
    assert ids(page.records) == ["s-busy-2", "s-busy-1"]


def test_a_stale_index_entry_is_skipped(store: Store) -> None:
    put(store, record("st", DAY0 + 5, revision=2))
    # an entry written behind the commits' back: the record no longer sits there
    shard = store.keys.shard_of("st")
    store.redis.zadd(store.keys.history_by_end(shard), {f"{DAY0:013d}:st": 0})
    assert ids(store.history.page(0, None, Filters(), 10, None).records) == ["st"]


def test_retention_drops_old_records_with_every_index_entry(store: Store) -> None:
    now = DAY0 + 100 * DAY_MS
    put(store, *(record(f"old-{n}", DAY0 + n) for n in range(5)))
    put(store, record("kept", now - 89 * DAY_MS))
    assert store.history.trim(now) == 5
    assert ids(store.history.page(0, None, Filters(), 10, None).records) == ["kept"]
    shard = store.keys.shard_of("kept")
    assert history_keys(store) == {
        k.encode()
        for k in (
            store.keys.history(shard),
            store.keys.history_by_end(shard),
            store.keys.history_by(shard, "number", "84899199866"),
            store.keys.history_by(shard, "number", "84909985668"),
            store.keys.history_by(shard, "user", "huydn"),
        )
    }
    assert store.history.trim(now) == 0


def test_a_shard_is_trimmed_once_its_oldest_record_is_an_hour_past_retention(
    store: Store,
) -> None:
    """So the trim takes a shard's drain lock about once an hour, not at every maintenance run;
    then every record past the retention goes, not only the hour-old ones."""
    retention_ms = store.settings.record_retention_days * DAY_MS
    now = DAY0 + 100 * DAY_MS
    call_ids = [f"due-{n}" for n in range(40)]
    one_shard = [c for c in call_ids if store.keys.shard_of(c) == 0][:2]
    late, later = one_shard
    put(store, record(late, now - retention_ms - 1000), record(later, now - retention_ms - 2000))
    assert store.history.trim(now) == 0, "past the retention by seconds: not yet"
    assert store.history.trim(now + TRIM_SLACK_MS) == 2


def test_maintenance_drops_the_records_past_retention(settings: Settings, redis: Redis) -> None:
    context = jobs.configure(settings, redis)
    now = context.store.log.server_time_ms()
    put(context.store, record("ancient", now - 91 * DAY_MS), record("recent", now - 89 * DAY_MS))
    assert jobs.maintain()["trimmed"] == 1
    assert ids(context.store.history.page(0, None, Filters(), 10, None).records) == ["recent"]


def test_retention_waits_for_a_shard_whose_drainer_holds_the_lock(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history_module, "LOCK_WAIT_SECONDS", 0.02)
    put(store, record("locked", DAY0))
    shard = store.keys.shard_of("locked")
    assert store.coordination.locks.acquire(shard, "drainer")
    assert store.history.trim(DAY0 + 100 * DAY_MS) == 0
    assert store.history.latest(["locked"])["locked"] is not None
    store.coordination.locks.release(shard, "drainer")
    assert store.history.trim(DAY0 + 100 * DAY_MS) == 1


def test_retention_in_batches(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_module, "TRIM_BATCH", 2)
    monkeypatch.setattr(history_module, "TRIM_BATCHES", 2)
    put(store, *(record(f"b-{n}", DAY0 + n) for n in range(12)))
    assert store.history.trim(DAY0 + 100 * DAY_MS) == 12  # up to 2 batches of 2 per shard
    assert store.history.page(0, None, Filters(), 50, None).records == []


def test_a_rebuild_writes_the_record_of_a_document_it_restores(
    deliver: Deliver, store: Store, machine: CallMachine
) -> None:
    doc = deliver(*scenario("h-rb", "busy", DAY0))
    store.redis.delete(store.keys.call("h-rb"), *history_keys(store))
    rebuild(store, machine)
    assert store.history.latest(["h-rb"]) == {"h-rb": record_of(doc)}
    assert ids(store.history.page(0, None, Filters(number="84909985668"), 5, None).records) == [
        "h-rb"
    ]


def test_iterating_a_long_range_keeps_memory_flat(store: Store) -> None:
    put(store, *(record(f"m-{n:05d}", DAY0 + n) for n in range(2400)))

    def peak(count: int) -> int:
        tracemalloc.start()
        walk = store.history.iter_records(0, None, Filters())
        seen = sum(1 for _ in itertools.islice(walk, count))
        assert seen == count
        found = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return found

    # a step's records are still held while the next is read: the peak is that of two steps
    two_steps, twelve_steps = peak(400), peak(2400)
    assert twelve_steps < 1.1 * two_steps, (two_steps, twelve_steps)


# --- HTTP ---


def test_search_over_http_with_cursor(client: FlaskClient, store: Store) -> None:
    put(store, *(record(f"w-{n}", DAY0 + n * 1000) for n in range(5)))
    first = client.get("/records?limit=3").get_json()
    assert ids(first["records"]) == ["w-4", "w-3", "w-2"]
    second = client.get(f"/records?limit=3&cursor={first['next_cursor']}").get_json()
    assert second == {"records": second["records"], "next_cursor": None}
    assert ids(second["records"]) == ["w-1", "w-0"]
    iso = client.get("/records?since=2025-11-24T16:00:01Z&until=1764000003000").get_json()
    assert ids(iso["records"]) == ["w-2", "w-1"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("since=yesterday", "since"),
        ("until=-5", "until"),
        ("since=2000&until=1000", "until"),
        ("disposition=hungup", "disposition"),
        ("direction=sideways", "direction"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("cursor=bm90LWEtbWVtYmVy", "cursor"),
        ("cursor=%25%25", "cursor"),
        ("number=" + "9" * 129, "number"),
        ("user=" + "u" * 129, "user"),
    ],
)
def test_a_bad_parameter_is_a_400_naming_it(client: FlaskClient, query: str, field: str) -> None:
    for path in ("/records", "/records.csv", "/records.jsonl"):
        if path != "/records" and field in ("limit", "cursor"):
            continue
        answer = client.get(f"{path}?{query}")
        assert answer.status_code == 400, (path, query)
        assert answer.get_json()["field"] == field


def test_a_cursor_is_the_member_it_encodes() -> None:
    place = f"{DAY0:013d}:call-vn-1-X"
    assert decode_cursor(encode_cursor(place)) == place


def test_csv_export_has_the_columns_and_defuses_formulas(client: FlaskClient, store: Store) -> None:
    hostile = record(
        "x-1",
        DAY0 + 2000,
        endCallCause='=HYPERLINK("http://evil","x")',
        request_from_user_id=" @SUM(A1)",
        to={"number": "+84909985668"},
        timeline={"ringing": DAY0, "answered": DAY0 + 1000, "ended": DAY0 + 2000},
        legs=[{"agent": "-1+1", "outcome": "answered"}],
        duration=-3,
        recording_url="\uff1dcmd",
    )
    put(store, hostile, record("x-0", DAY0))
    answer = client.get("/records.csv")
    assert answer.status_code == 200 and answer.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(answer.get_data(as_text=True))))
    assert [row["call_id"] for row in rows] == ["x-1", "x-0"]
    row = rows[0]
    assert row["start_time"] == "2025-11-24T16:00:00.000Z" and row["start_ms"] == str(DAY0)
    assert row["answer_time"] == "2025-11-24T16:00:01.000Z"
    assert row["end_time"] == "2025-11-24T16:00:02.000Z" and row["end_ms"] == str(DAY0 + 2000)
    assert row["endCallCause"] == '\'=HYPERLINK("http://evil","x")'
    assert row["user"] == "' @SUM(A1)"
    assert row["to_number"] == "'+84909985668"
    assert row["agent"] == "'-1+1"
    assert row["recording_url"] == "'\uff1dcmd"
    assert row["duration"] == "-3"  # a number, not text a spreadsheet evaluates


def test_jsonl_export_is_every_record_whole(client: FlaskClient, store: Store) -> None:
    put(store, record("j-1", DAY0 + 1), record("j-0", DAY0, disposition="busy"))
    answer = client.get("/records.jsonl?disposition=busy")
    assert answer.mimetype == "application/x-ndjson"
    lines = answer.get_data(as_text=True).splitlines()
    assert [json.loads(line) for line in lines] == [record("j-0", DAY0, disposition="busy")]


def test_the_read_token_guards_the_history(settings: Settings, redis: Redis) -> None:
    client = create_app(dataclasses.replace(settings, api_token="tok"), redis).test_client()
    for path in ("/records", "/records.csv", "/records.jsonl"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer tok"}).status_code == 200


def test_the_agent_column_names_who_answered(client: FlaskClient, store: Store) -> None:
    legs = [
        {"agent": "agent-1", "outcome": "missed"},
        {"agent": "agent-3", "outcome": "answered"},
        {"agent": "agent-4", "outcome": "missed"},
    ]
    put(store, record("a-1", DAY0, legs=legs, to=to_agent("agent-4")))
    rows = list(csv.DictReader(io.StringIO(client.get("/records.csv").get_data(as_text=True))))
    assert rows[0]["agent"] == "agent-3"


def test_a_small_page_with_a_rare_match_reads_in_growing_steps(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(store, record("rare", DAY0, disposition="busy"))
    put(store, *(record(f"r-{n:03d}", DAY0 + 1 + n) for n in range(600)))
    steps = []
    real_records = store.history._records

    def counted(places: list[str]) -> dict[str, Record]:
        steps.append(len(places))
        return real_records(places)

    monkeypatch.setattr(store.history, "_records", counted)
    page = store.history.page(0, None, Filters(disposition="busy"), 1, None)
    assert ids(page.records) == ["rare"] and page.next_after is None
    assert steps == [1, 2, 4, 8, 16, 32, 64, 128, 200, 146]
