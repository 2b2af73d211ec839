"""What the live call board shows of a call, a final record and a rejection, and the message a
drainer's commit publishes for the board: built from what the commit already holds."""

from __future__ import annotations

import json
from typing import Any

from redis.client import Pipeline

from callstate import streamids
from callstate.calldoc import Record
from callstate.calls import Applied, Doc, is_active
from callstate.keys import Keys
from callstate.record import call_direction, leg_agent

# Values shown on the board are cut to this many characters: a sender controls them, and one
# message carries a whole batch.
MAX_TEXT = 64
# A batch whose message would be larger publishes `RESET_HINT` instead, on which boards reload
# their picture: one 500-event batch of 250 calls would otherwise be ~230 KB, sent to every board.
MAX_MESSAGE_BYTES = 64 * 1024
RESET_HINT = '{"reset":true}'
# Rejections kept per shard for a board that loads its first picture.
REJECTIONS_KEPT = 50

Summary = dict[str, Any]


def call_summary(doc: Doc) -> Summary:
    """A call as the board shows it: who calls whom, the agent, and since when it is in its
    status (the timestamp of the event that moved it there: statuses never repeat in a row)."""
    fields = doc["fields"]
    return {
        "call_id": doc["call_id"],
        "status": doc["status"],
        "active": is_active(doc),
        "caller": _number(fields, "from"),
        "callee": _number(fields, "to"),
        "agent": _call_agent(doc),
        "since_ms": doc["last_timestamp_ms"],
        "version": doc["version"],
    }


def record_summary(record: Record) -> Summary:
    """A final record as the board shows it: how the call ended and who was on it."""
    timeline = record.get("timeline")
    known = timeline.values() if isinstance(timeline, dict) else ()
    times = [t for t in known if isinstance(t, int)]
    # Never cut: the webhook bounds it (128 characters), and a cut one could be another call's.
    call_id = record.get("call_id")
    return {
        "call_id": call_id if isinstance(call_id, str) else None,
        "revision": _integer(record.get("revision")),
        "disposition": _text(record.get("disposition")),
        "duration": _integer(record.get("duration")),
        "answer_duration": _integer(record.get("answerDuration")),
        "sip_code": _integer(record.get("sip_code")),
        "end_cause": _text(record.get("endCallCause")),
        "closed_by": _text(record.get("closed_by")),
        "caller": _number(record, "from"),
        "callee": _number(record, "to"),
        "agent": _record_agent(record),
        "ended_ms": max(times) if times else None,
    }


def batch_rejections(applied: Applied, after: str | None) -> list[Summary]:
    """The batch's rejected events, in log order: its entries are the journal entries logged
    after the cursor the batch started from."""
    start = streamids.parse(after) if after else (0, 0)
    found = []
    for doc in applied.docs.values():
        for item in reversed(doc["journal"]):
            if streamids.parse(item["log_id"]) <= start:
                break
            if item["verdict"] == "rejected":
                found.append(_rejection(doc["call_id"], item))
    return sorted(found, key=lambda item: streamids.parse(item["log_id"]))


def batch_message(shard: int, applied: Applied, after: str | None) -> Summary | None:
    """What the board needs to know of a committed batch; None when it shows nothing of it."""
    message = {
        "shard": shard,
        "calls": [call_summary(doc) for doc in applied.docs.values()],
        "records": [record_summary(record) for record in applied.records],
        "rejections": batch_rejections(applied, after),
    }
    if not (message["calls"] or message["records"] or message["rejections"]):
        return None
    return message


def queue_board_update(
    pipe: Pipeline, keys: Keys, shard: int, applied: Applied, after: str | None
) -> None:
    """Within a batch's transaction: publish the batch to the shard's board channel (or, when it is
    too large, `RESET_HINT`) and keep its rejections in the shard's capped list, so a board learns
    exactly what was committed."""
    message = batch_message(shard, applied, after)
    if message is None:
        return
    published = json.dumps(message, separators=(",", ":"))
    if len(published) > MAX_MESSAGE_BYTES:
        published = RESET_HINT
    pipe.publish(keys.board_channel(shard), published)
    if message["rejections"]:
        key = keys.board_rejections(shard)
        pipe.lpush(key, *(json.dumps(item) for item in message["rejections"]))
        pipe.ltrim(key, 0, REJECTIONS_KEPT - 1)


def _rejection(call_id: str, item: Any) -> Summary:
    return {
        "source": "event",
        "call_id": call_id,
        "log_id": item["log_id"],
        "call_status": _text(item.get("call_status")),
        "reason": _text(item.get("reason")),
        "ms": streamids.millis(item["log_id"]),
    }


def _call_agent(doc: Doc) -> str | None:
    """The agent of the call's latest leg, told as its record tells it; before any leg, the
    user who placed the call."""
    fields = doc["fields"]
    if doc["legs"]:
        agent = _text(leg_agent(doc["legs"][-1], call_direction(fields)))
        if agent:
            return agent
    return _text(fields.get("request_from_user_id"))


def _record_agent(record: Record) -> str | None:
    legs = record.get("legs")
    if isinstance(legs, list) and legs and isinstance(legs[-1], dict):
        agent = _text(legs[-1].get("agent"))
        if agent:
            return agent
    return _text(record.get("request_from_user_id"))


def _number(container: Any, party: str) -> str | None:
    found = container.get(party) if isinstance(container, dict) else None
    return _text(found.get("number")) if isinstance(found, dict) else None


def _text(value: Any) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
