"""Builders for realistic Stringee payloads, shared by unit and integration tests."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from redis import Redis

from callstate import recordstream
from callstate.calldoc import CallDoc, Record
from callstate.connection import StreamRows
from callstate.keys import Keys

DATA = Path(__file__).parent / "data"


def example(name: str) -> dict[str, Any]:
    """One of the provider's documented example payloads, as received."""
    loaded: dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    return loaded


def event(call_id: str, status: str, ts: int, **extra: Any) -> dict[str, Any]:
    """A call event shaped like the provider's, with `extra` fields added or replaced."""
    payload: dict[str, Any] = {
        "call_status": status,
        "project_id": 25,
        "request_from_user_id": "huydn",
        "account_sid": "ACab9b9bcf6391c6af9fe1663c729e3a6b",
        "timestamp_ms": ts,
        "from": {
            "number": "84899199866",
            "alias": "84899199866",
            "is_online": False,
            "type": "internal",
        },
        "to": {
            "number": "84909985668",
            "alias": "84909985668",
            "is_online": False,
            "type": "external",
        },
        "clientCustomData": "",
        "type": "stringee_call",
        "call_id": call_id,
    }
    payload.update(extra)
    return payload


def ended(call_id: str, ts: int, cause: str, answer_duration: int, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "callCreatedReason": "CLIENT_MAKE_CALL",
        "endCallCause": cause,
        "endedBy": "EXTERNAL",
        "callType": "CALL",
        "duration": answer_duration + 9,
        "answerDuration": answer_duration,
    }
    return event(call_id, "ended", ts, **(fields | extra))


def to_agent(number: str) -> dict[str, Any]:
    return {"number": number, "alias": number, "is_online": True, "type": "internal"}


def body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


SCENARIOS = ("answered", "busy", "no_answer", "failed", "call_center")


def scenario(call_id: str, kind: str, start_ms: int) -> list[dict[str, Any]]:
    """The in-order events of one realistic call of the given kind; timestamps strictly rise."""
    inbound = {"callCreatedReason": "EXTERNAL_CALL_IN"}
    steps: list[tuple[str, dict[str, Any]]]
    if kind == "answered":
        steps = [("created", {}), ("started", {}), ("ringing", {}), ("answered", {})]
        end = ("USER_END_CALL", 42)
    elif kind == "busy":
        steps, end = [("created", {}), ("ringing", {})], ("486 Busy Here", 0)
    elif kind == "no_answer":
        steps, end = [("ringing", {})], ("480 Temporarily Unavailable", 0)
    elif kind == "failed":
        steps, end = [("created", {})], ("CAN_NOT_MAKE_CALL", 0)
    else:
        steps = [("created", inbound)]
        for agent in ("agent-1", "agent-2"):
            steps += [
                ("ringing", {"to": to_agent(agent), **inbound}),
                ("agentEnded", {"to": to_agent(agent), **inbound}),
            ]
        steps += [
            ("ringing", {"to": to_agent("agent-3"), **inbound}),
            ("answered", {"to": to_agent("agent-3"), **inbound}),
        ]
        end = ("USER_END_CALL", 30)
    events = [
        event(call_id, status, start_ms + n, **extra) for n, (status, extra) in enumerate(steps)
    ]
    extra_end = inbound if kind == "call_center" else {}
    events.append(ended(call_id, start_ms + len(steps), end[0], end[1], **extra_end))
    return events


def record_of(doc: CallDoc | None) -> Record:
    """The record of a call that must have one."""
    assert doc is not None and doc["record"] is not None
    return doc["record"]


def known_burst(prefix: str) -> list[dict[str, Any]]:
    """Seven events of three calls whose every verdict is known: 5 accepted, 1 out of order, 1
    duplicate; one call ends (a record), one stays ringing and one answered."""
    a, b, c = f"{prefix}-a", f"{prefix}-b", f"{prefix}-c"
    return [
        event(a, "ringing", 100),
        event(a, "answered", 200),
        event(a, "ringing", 150),  # rejected: out_of_order
        event(a, "answered", 200),  # duplicate
        event(b, "ringing", 100),
        ended(b, 300, "USER_END_CALL", 0),  # a record
        event(c, "ringing", 100),
    ]


def published(redis: Redis, keys: Keys) -> StreamRows:
    """Every shard's records stream as one list of rows, oldest first."""
    return [(row.entry_id.encode(), row.fields) for row in recordstream.every(redis, keys)]


OLD_STORE = Path(__file__).parent / "data" / "store-before-hash-tags.json"


def b64(raw: str) -> bytes:
    return base64.b64decode(raw)


def load_old_store(redis: Redis) -> dict[str, Any]:
    """Write the keys of a store the release before hash tags wrote (made by 20979eb: 12 calls on
    4 shards with forwarding on, one event logged and not applied, a tombstone, a dead letter)
    as they were, TTLs included; return the fixture."""
    fixture: dict[str, Any] = json.loads(OLD_STORE.read_text())
    for raw_key, item in fixture["keys"].items():
        key, value = b64(raw_key), item["value"]
        if item["type"] == "string":
            redis.set(key, b64(value))
        elif item["type"] == "hash":
            redis.hset(key, mapping={b64(k): b64(v) for k, v in value.items()})
        elif item["type"] == "zset":
            redis.zadd(key, {b64(member): score for member, score in value})
        elif item["type"] == "list":
            redis.rpush(key, *(b64(v) for v in value))
        else:
            for entry_id, fields in value:
                redis.xadd(key, {b64(k): b64(v) for k, v in fields.items()}, id=entry_id)
        if item["pttl"] > 0:
            redis.pexpire(key, item["pttl"])
    return fixture
