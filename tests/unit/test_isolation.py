"""A log entry that cannot be applied is set aside with a verdict; its shard keeps flowing."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, cast

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT, FieldT

import callstate.calls
from callstate.calls import Doc
from callstate.codec import pack
from callstate.config import Settings
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.rebuild import derive, differences
from callstate.store import Store, event_fields
from tests.factories import body, ended, event

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
    "UnicodeEncodeError": STATUS + b',"x":"\\ud800"}',
    "too_deep": STATUS + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "KeyError": b'{"call_id":"%s","timestamp_ms":5}',
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
    aside[log_fields(store, {"event": pack(b"{}")})] = "KeyError"
    log_raw(store, control, body(ended(control, 100, "USER_END_CALL", 30)))

    drainer.drain(SHARD)

    assert not store.has_backlog(SHARD)
    doc = store.get_doc(control)
    assert doc is not None and doc["status"] == "ended"
    # answered -> answered is not a transition: what matters is that every event got its verdict.
    assert verdicts(doc) == [("accepted", None)] * 2 + [("rejected", "illegal_transition")] * 3 + [
        ("accepted", None)
    ]
    assert doc["record"]["disposition"] == "answered"
    for (error, _), call_id in zip(POISON.items(), poisoned, strict=False):
        poisoned_doc = store.get_doc(call_id)
        assert verdicts(poisoned_doc) == [("rejected", "unprocessable")]
        assert poisoned_doc is not None and poisoned_doc["journal"][0]["error"] == error
        assert poisoned_doc["counts"]["rejected"] == 1 and poisoned_doc["status"] is None
    assert store.get_doc(garbled) is not None
    assert {item["log_id"]: item["call_id"] for item in store.quarantined(20)} == {
        log_id: call_id
        for log_id, call_id in zip(aside, [*poisoned[:-1], garbled, unreadable], strict=True)
    }
    assert int(store.redis.get(store.keys.unprocessable_counter(SHARD)) or 0) == len(aside)
    assert differences(store, derive(store, machine, batch=3)) == []


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

    doc = store.get_doc(call)
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
    assert differences(store, derive(store, machine, batch=2)) == []


def test_redis_trouble_is_retried_and_skips_nothing(
    store: Store, drainer: Drainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    [call] = ids_in_shard(store, "c", 1)
    log_raw(store, call, body(event(call, "ringing", 1)))
    calls = {"n": 0}
    real_load = store.load_docs

    def load_fails_once(call_ids: Any) -> dict[str, Doc | None]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RedisConnectionError("connection reset")
        return real_load(call_ids)

    monkeypatch.setattr(store, "load_docs", load_fails_once)
    with pytest.raises(RedisConnectionError):
        drainer.drain(SHARD)
    assert store.has_backlog(SHARD)
    assert store.get_doc(call) is None
    store.release_drain_lock(SHARD, _lock_holder(store))
    drainer.drain(SHARD)
    assert verdicts(store.get_doc(call)) == [("accepted", None)]
    assert store.quarantined(5) == []


def _lock_holder(store: Store) -> str:
    holder = cast(bytes | None, store.redis.get(store.keys.drain_lock(SHARD)))
    return holder.decode() if holder else ""


def bounded_store(redis: Redis, settings: Settings, limit: int) -> tuple[Store, Drainer]:
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
    doc = store.get_doc(call)
    assert doc is not None
    assert len(doc["journal"]) == 10 and len(doc["seen"]) == 10 and len(doc["legs"]) == 5
    assert doc["counts"]["accepted"] == 10 and doc["counts"]["rejected"] == 50
    assert doc["overflow"]["reason"] == "too_many_events"
    assert doc["overflow"]["count"] == 50
    assert sizes[2] - sizes[1] < 8, sizes  # only counters and ids change past the bound
    assert differences(store, derive(store, CallMachine(), batch=4)) == []


def test_a_call_at_its_bound_still_gets_swept(redis: Redis, settings: Settings) -> None:
    store, drainer = bounded_store(redis, settings, limit=2)
    [call] = ids_in_shard(store, "s", 1)
    for ts in (1, 2, 3):
        log_raw(store, call, body(event(call, "ringing", ts)))
    drainer.drain(SHARD)
    store.append_sweep(call, store.server_time_ms() + 1)
    drainer.drain(SHARD)
    doc = store.get_doc(call)
    assert doc is not None and doc["status"] == "ended" and doc["closed_by"] == "sweeper"
    assert json.loads(json.dumps(doc)) == doc
