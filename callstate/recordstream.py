"""The final records' streams, one per shard (a commit writes its own shard's only), read as one:
the latest, those since a time, and those appended after what a reader has seen."""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import cast

from redis import Redis
from redis.typing import KeyT, StreamIdT

from callstate import streamids
from callstate.connection import StreamRows, is_cluster, text
from callstate.keys import Keys


@dataclass(frozen=True)
class StreamRecord:
    """One entry of a shard's records stream: its id is unique within the shard only."""

    shard: int
    entry_id: str
    fields: dict[bytes, bytes]

    @property
    def order(self) -> tuple[int, int, int]:
        """Appended-at order across shards: Redis' clock, then the shard."""
        millis, seq = streamids.parse(self.entry_id)
        return millis, seq, self.shard


def newest(redis: Redis, keys: Keys, count: int) -> list[StreamRecord]:
    """The `count` latest records over every shard, newest first: one round trip."""
    pipe = redis.pipeline(transaction=False)
    for shard in range(keys.shards):
        pipe.xrevrange(keys.records(shard), count=count)
    found = _entries(pipe.execute())
    return heapq.nlargest(count, found, key=lambda r: r.order)


def since(redis: Redis, keys: Keys, since_ms: int, count: int) -> list[StreamRecord]:
    """The first `count` records appended at or after `since_ms`, oldest first."""
    pipe = redis.pipeline(transaction=False)
    for shard in range(keys.shards):
        pipe.xrange(keys.records(shard), f"{since_ms}-0", count=count)
    found = _entries(pipe.execute())
    return heapq.nsmallest(count, found, key=lambda r: r.order)


def every(redis: Redis, keys: Keys) -> list[StreamRecord]:
    """Every record kept, oldest first (for tests and benchmarks: streams are capped)."""
    pipe = redis.pipeline(transaction=False)
    for shard in range(keys.shards):
        pipe.xrange(keys.records(shard))
    return sorted(_entries(pipe.execute()), key=lambda r: r.order)


def positions(keys: Keys, start: str) -> dict[str, str]:
    """Where a reader starts in every shard's stream: after the id `start` (`$`: the end)."""
    return {keys.records(shard): start for shard in range(keys.shards)}


def after(
    redis: Redis, keys: Keys, seen: dict[str, str], block_ms: int, count: int = 100
) -> list[StreamRecord]:
    """Records appended after the positions in `seen` (stream key to id), oldest first, waiting
    up to `block_ms` for one; `seen` moves past what is returned. A position per shard, as two
    shards' streams can hold the same id."""
    found = _read_after(redis, seen, count, block_ms)
    shard_of = {keys.records(shard): shard for shard in range(keys.shards)}
    records = [
        StreamRecord(shard_of[text(stream)], text(raw_id), fields)
        for stream, rows in found
        for raw_id, fields in rows
    ]
    # COUNT holds per stream: a shard cut at it may hold records older than another's returned,
    # so only those up to the earliest cut are returned now, the rest read again next time.
    cuts = [
        StreamRecord(shard_of[text(stream)], text(rows[-1][0]), {}).order
        for stream, rows in found
        if len(rows) >= count
    ]
    if cuts:
        records = [record for record in records if record.order <= min(cuts)]
    records.sort(key=lambda r: r.order)
    for record in records:
        seen[keys.records(record.shard)] = record.entry_id
    return records


def _read_after(
    redis: Redis, seen: dict[str, str], count: int, block_ms: int
) -> list[tuple[bytes, StreamRows]]:
    """One XREAD over every shard's stream; on a cluster, where one command cannot span the
    shards' slots, one XREAD per stream in a pipeline, and a wait of `block_ms` when all are
    empty (a blocking read waits on one server only)."""
    if not is_cluster(redis):
        read = redis.xread(_streams(seen), count=count, block=block_ms)
        return cast(list[tuple[bytes, StreamRows]], read or [])
    pipe = redis.pipeline(transaction=False)
    for key, entry_id in seen.items():
        pipe.xread({key: entry_id}, count=count)
    replies: list[list[tuple[bytes, StreamRows]] | None] = pipe.execute()
    found = [(stream, rows) for reply in replies if reply for stream, rows in reply]
    if not found and block_ms:
        time.sleep(block_ms / 1000)
    return found


def _streams(seen: dict[str, str]) -> dict[KeyT, StreamIdT]:
    return {key: entry_id for key, entry_id in seen.items()}


def _entries(replies: list[StreamRows]) -> list[StreamRecord]:
    return [
        StreamRecord(shard, text(raw_id), fields)
        for shard, rows in enumerate(replies)
        for raw_id, fields in rows
    ]
