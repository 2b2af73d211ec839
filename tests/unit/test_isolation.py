"""A log entry that cannot be applied is set aside with a verdict; its shard keeps flowing."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, cast

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT, FieldT
from rq.timeouts import JobTimeoutException

import callstate.calls
from callstate.calls import Doc, LogEntry
from callstate.codec import pack
from callstate.config import Settings
from callstate.drain import Drainer
from callstate.eventlog import event_fields
from callstate.figures import read_figures
from callstate.machine import CallMachine
from callstate.rebuild import check
from callstate.store import Store
from tests.factories import body, ended, event, published, record_of

SHARD = 1


def ids_in_shard(store: Store, prefix: str, count: int) -> list[str]:
    """Call ids that all hash to SHARD, so their entries share one log and one batch."""
    found = (f"{prefix}-{n}" for n in range(10_000))
    return [c for c in found if store.keys.shard_of(c) == SHARD][:count]


def log_raw(store: Store, call_id: str, raw: bytes) -> str:
    """Log a body as a webhook of an older, less careful version could have logged it."""
    return log_fields(store, event_fields(call_id, raw))


def log_fields(store: Store, fields: dict[FieldT, EncodableT]) -> str:
    return cast(bytes, store.redis.xadd(store.keys.log(SHARD), fields)).decode()


def verdicts(doc: Doc | None) -> list[tuple[str, str | None]]:
    assert doc is not None
    return [(item["verdict"], item["reason"]) for item in doc["journal"]]


STATUS = b'{"call_id":"%s","call_status":"ringing","timestamp_ms":5'
POISON: dict[str, bytes] = {
    # A lone surrogate: refused as the body is decoded, whatever the rest of its batch holds.
    "invalid_field": STATUS + b',"x":"\\ud800"}',
    "too_deep": STATUS + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "AttributeError": STATUS + b',"to":"84909985668"}',
}


def test_poison_entries_are_set_aside_and_the_shard_keeps_flowing(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    control, *poisoned = ids_in_shard(store, "call", 1 + len(POISON) + 1)
    garbled, unreadable = poisoned[-1], ""
    aside: dict[str, str] = {}
    log_raw(store, control, body(event(control, "ringing", 10)))
    for (error, template), call_id in zip(POISON.items(), poisoned, strict=False):
        aside[log_raw(store, call_id, template % call_id.encode())] = error
        log_raw(store, control, body(event(control, "answered", 10 + len(aside))))
    aside[log_fields(store, {"call_id": garbled, "event": b"\x01not zlib"})] = "zlib.error"
    aside[log_fields(store, {"event": pack(b"{}")})] = "invalid_call_id"
    log_raw(store, control, body(ended(control, 100, "USER_END_CALL", 30)))

    drainer.drain(SHARD)

    assert not store.log.has_backlog(SHARD)
    doc = store.docs.get_doc(control)
    assert doc is not None and doc["status"] == "ended"
    # answered -> answered is not a transition: what matters is that every event got its verdict.
    assert verdicts(doc) == [("accepted", None)] * 2 + [("rejected", "illegal_transition")] * 2 + [
        ("accepted", None)
    ]
    assert record_of(doc)["disposition"] == "answered"
    for (error, _), call_id in zip(POISON.items(), poisoned, strict=False):
        poisoned_doc = store.docs.get_doc(call_id)
        assert verdicts(poisoned_doc) == [("rejected", "unprocessable")]
        assert poisoned_doc is not None and poisoned_doc["journal"][0]["error"] == error
        assert poisoned_doc["counts"]["rejected"] == 1 and poisoned_doc["status"] is None
    assert store.docs.get_doc(garbled) is not None
    assert {item["log_id"]: item["call_id"] for item in store.quarantine.recent(20)} == {
        log_id: call_id
        for log_id, call_id in zip(aside, [*poisoned[:-1], garbled, unreadable], strict=True)
    }
    assert int(store.redis.hget(store.keys.verdicts(SHARD), "rejected:unprocessable") or 0) == len(
        aside
    )
    assert check(store, machine, 3).differing == []


def test_the_entry_that_breaks_leaves_its_call_as_it_was_and_later_entries_apply(
    store: Store, drainer: Drainer, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    [call] = ids_in_shard(store, "c", 1)
    real_accept = callstate.calls._accept

    def accept_unless_777(doc: Doc, payload: dict[str, Any], status: str, ts: int) -> None:
        real_accept(doc, payload, status, ts)
        if ts == 777:
            raise RuntimeError("a bug that only this event reaches")

    monkeypatch.setattr(callstate.calls, "_accept", accept_unless_777)
    log_raw(store, call, body(event(call, "ringing", 700)))
    drainer.drain(SHARD)
    for status, ts in (("answered", 777), ("answered", 800), ("ended", 900)):
        log_raw(store, call, body(event(call, status, ts)))
    drainer.drain(SHARD)

    doc = store.docs.get_doc(call)
    assert verdicts(doc) == [
        ("accepted", None),
        ("rejected", "unprocessable"),
        ("accepted", None),
        ("accepted", None),
    ]
    assert doc is not None
    assert doc["journal"][1] | {"log_id": None} == {
        "log_id": None,
        "verdict": "rejected",
        "reason": "unprocessable",
        "call_status": "answered",
        "timestamp_ms": 777,
        "error": "RuntimeError",
    }
    assert doc["timeline"] == {"ringing": 700, "answered": 800, "ended": 900}
    assert doc["counts"] == {"accepted": 3, "duplicate": 0, "rejected": 1, "annotation": 0}
    assert read_figures(store).verdicts == {"accepted": 3, "rejected:unprocessable": 1}
    assert check(store, machine, 2).differing == []


def test_redis_trouble_is_retried_and_skips_nothing(
    store: Store, drainer: Drainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    [call] = ids_in_shard(store, "c", 1)
    log_raw(store, call, body(event(call, "ringing", 1)))
    calls = {"n": 0}
    real_load = drainer.snapshots.docs_and_tombstones

    def load_fails_once(call_ids: list[str]) -> tuple[dict[str, Doc | None], Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RedisConnectionError("connection reset")
        return real_load(call_ids)

    monkeypatch.setattr(drainer.snapshots, "docs_and_tombstones", load_fails_once)
    with pytest.raises(RedisConnectionError):
        drainer.drain(SHARD)
    assert store.log.has_backlog(SHARD)
    assert store.docs.get_doc(call) is None
    store.coordination.locks.release(SHARD, _lock_holder(store))
    drainer.drain(SHARD)
    assert verdicts(store.docs.get_doc(call)) == [("accepted", None)]
    assert store.quarantine.recent(5) == []


def _lock_holder(store: Store) -> str:
    holder = cast(bytes | None, store.redis.get(store.keys.drain_lock(SHARD)))
    return holder.decode() if holder else ""


def bounded_store(redis: Redis, settings: Settings, limit: int) -> tuple[Store, Drainer]:
    """A store whose calls journal at most `limit` events, with a drainer on it."""
    store = Store(redis, dataclasses.replace(settings, max_events_per_call=limit))
    drainer = Drainer(
        store, CallMachine(), batch=7, slice_ms=60_000, linger_ms=0, window_ms=0, wake=print
    )
    return store, drainer


def test_a_call_stops_growing_at_its_event_bound(redis: Redis, settings: Settings) -> None:
    store, drainer = bounded_store(redis, settings, limit=10)
    [call] = ids_in_shard(store, "cc", 1)
    sizes = []
    for round_ in range(3):
        for n in range(20):
            ts = round_ * 100 + n
            log_raw(store, call, body(event(call, ("ringing", "agentEnded")[n % 2], ts)))
        drainer.drain(SHARD)
        sizes.append(len(redis.get(store.keys.call(call)) or b""))
    doc = store.docs.get_doc(call)
    assert doc is not None
    assert len(doc["journal"]) == 10 and len(doc["seen"]) == 10 and len(doc["legs"]) == 5
    assert doc["counts"]["accepted"] == 10 and doc["counts"]["rejected"] == 50
    assert doc["overflow"]["reason"] == "too_many_events"
    assert doc["overflow"]["count"] == 50
    assert sizes[2] - sizes[1] < 8, sizes  # only counters and ids change past the bound
    assert check(store, CallMachine(), 4).differing == []


def test_a_call_at_its_bound_still_gets_swept(redis: Redis, settings: Settings) -> None:
    store, drainer = bounded_store(redis, settings, limit=2)
    [call] = ids_in_shard(store, "s", 1)
    for ts in (1, 2, 3):
        log_raw(store, call, body(event(call, "ringing", ts)))
    drainer.drain(SHARD)
    store.log.append_sweep(call, store.log.server_time_ms() + 1)
    drainer.drain(SHARD)
    doc = store.docs.get_doc(call)
    assert doc is not None and doc["status"] == "ended" and doc["closed_by"] == "sweeper"
    assert json.loads(json.dumps(doc)) == doc


def test_a_job_timeout_stops_the_batch_and_sets_nothing_aside(
    store: Store, drainer: Drainer, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure of the process (RQ's job timeout, memory) is not the entry's: the batch is
    retried later, and no acknowledged event is set aside for it."""
    legacy, victim = ids_in_shard(store, "t", 2)
    log_raw(store, victim, body(event(victim, "ringing", 1)))
    # Forces the entry-by-entry pass: a body an older web logged, which fails as it is applied.
    log_raw(store, legacy, POISON["AttributeError"] % legacy.encode())
    real_apply, seen = callstate.calls.apply_entry, []

    def times_out_in_the_second_pass(doc: Doc | None, entry: LogEntry, *rest: Any) -> Any:
        seen.append(entry.call_id)
        if seen.count(victim) == 2:
            raise JobTimeoutException("Task exceeded maximum timeout value")
        return real_apply(doc, entry, *rest)

    monkeypatch.setattr(callstate.calls, "apply_entry", times_out_in_the_second_pass)
    with pytest.raises(JobTimeoutException):
        drainer.drain(SHARD)
    monkeypatch.undo()
    assert store.docs.get_doc(victim) is None and store.log.has_backlog(SHARD)
    store.coordination.locks.release(SHARD, _lock_holder(store))
    drainer.drain(SHARD)
    assert verdicts(store.docs.get_doc(victim)) == [("accepted", None)]
    assert check(store, machine, 7).differing == []


LEGACY = {"call_id": "legacy-1", "call_status": "ringing", "timestamp_ms": 1}


@pytest.mark.parametrize(
    "raw",
    [
        b"\xef\xbb\xbf" + body(LEGACY),
        json.dumps(LEGACY).encode("utf-16"),
        body(LEGACY)[:-1] + b', "x": NaN}',
        body(LEGACY)[:-1] + b', "x": ' + b"[" * 20 + b"]" * 20 + b"}",
    ],
)
def test_bodies_earlier_versions_logged_still_apply(
    store: Store, drainer: Drainer, raw: bytes
) -> None:
    """Earlier webhooks took what the standard library parses; their logged bodies must keep
    applying as they did, or a rebuild after an upgrade would change acknowledged calls."""
    log_fields(store, {"call_id": "legacy-1", "event": pack(raw)})
    drainer.drain(SHARD)
    assert verdicts(store.docs.get_doc("legacy-1")) == [("accepted", None)]


def test_a_call_stops_growing_at_its_byte_bound(redis: Redis, settings: Settings) -> None:
    """Bytes are bounded as events are: otherwise every notice bringing a new large field after
    the end republishes a record carrying all the earlier ones (quadratic in what was posted)."""
    store, drainer = bounded_store(redis, dataclasses.replace(settings, max_call_bytes=40_000), 500)
    [call] = ids_in_shard(store, "big", 1)
    log_raw(store, call, body(ended(call, 10, "486 Busy Here", 0)))
    posted = 0
    for n in range(10):
        raw = json.dumps({"call_id": call, "recording_url": "https://r", f"f{n}": "A" * 15_000})
        posted += len(raw)
        log_raw(store, call, raw.encode())
    drainer.drain(SHARD)

    doc = store.docs.get_doc(call)
    assert doc is not None
    # The end (~500 bytes) and two 15 kB notices fit in 40 kB; a third does not.
    assert [r for _, r in verdicts(doc)] == [None, None, None] + ["too_large"] * 8
    assert record_of(doc)["revision"] == 3 and "f2" not in record_of(doc)
    records = published(redis, store.keys)
    assert sum(len(fields[b"record"]) for _, fields in records) < posted
    assert store.quarantine.recent(5) == []
    assert check(store, CallMachine(), 3).differing == []


def test_a_call_stops_publishing_at_its_revision_bound(redis: Redis, settings: Settings) -> None:
    """Tiny notices that each change the record would each republish it whole."""
    limited = dataclasses.replace(settings, max_record_revisions=3)
    store, drainer = bounded_store(redis, limited, 500)
    [call] = ids_in_shard(store, "rev", 1)
    log_raw(store, call, body(ended(call, 10, "486 Busy Here", 0, clientCustomData="x" * 5000)))
    for n in range(6):
        log_raw(store, call, json.dumps({"call_id": call, "recording_url": f"r{n}"}).encode())
    drainer.drain(SHARD)

    doc = store.docs.get_doc(call)
    assert [r for _, r in verdicts(doc)] == [None, None, None] + ["too_many_revisions"] * 4
    assert doc is not None and record_of(doc)["recording_url"] == "r1"
    records = published(redis, store.keys)
    assert [json.loads(fields[b"record"])["revision"] for _, fields in records] == [1, 2, 3]
    assert check(store, CallMachine(), 2).differing == []
