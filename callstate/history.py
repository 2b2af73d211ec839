"""The records history: per shard, the latest revision of each call's record and lexicographic
indexes over it by end time, number and user, kept for `CALLSTATE_RECORD_RETENTION_DAYS`.

Every index is a sorted set whose scores are all 0 and whose members are
`<end ms, 13 digits>:<call_id>`: a range BYLEX, reversed, is newest first with a tie-break, and
a member is an exact, exclusive cursor. Written only inside a drainer's commit (and a rebuild's
rewrite) and trimmed under the shard's drain lock, so every key is the shard's own; reads fan
out over the shards and merge. The index is a hint, the stored record the truth: a member whose
record no longer has that end time or those parties is skipped when read.
"""

from __future__ import annotations

import heapq
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar, cast

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError

from callstate.calldoc import Record
from callstate.codec import dumps, pack, unpack
from callstate.config import Settings
from callstate.connection import text, watched_transaction
from callstate.coordination import DrainCoordination
from callstate.keys import Keys
from callstate.record import record_end_ms

END_DIGITS = 13
LATEST_END_MS = 10**END_DIGITS - 1
DAY_MS = 86_400_000
# Members or fields per command queued for the commit script: Lua unpacks at most ~8,000
# arguments into one command.
ITEMS_PER_COMMAND = 1000
T = TypeVar("T")
# Members read per shard and merged per step of a walk: one pipelined round trip each.
WALK_STEP = 200
# Members a page examines at most before it answers short, with a cursor to go on from.
PAGE_BUDGET = 10 * WALK_STEP
# A batch holds the shard's drain lock while it reads and drops its records (~80 ms a thousand,
# measured): 200 keep each pause to a drain slice's order; 50 batches still drop 10,000 records a
# shard and run, more than a busy day brings.
TRIM_BATCH = 200
TRIM_BATCHES = 50
# A shard's records are trimmed once the oldest is this much past the retention, all that are
# past it then: its drain lock is taken about once an hour, not at every maintenance run.
TRIM_SLACK_MS = 3_600_000
LOCK_WAIT_SECONDS = 1.0


@dataclass(frozen=True)
class Filters:
    """What a search keeps besides its time range; `None` keeps any."""

    disposition: str | None = None
    direction: str | None = None
    number: str | None = None
    user: str | None = None

    def match(self, record: Record) -> bool:
        if self.disposition is not None and record.get("disposition") != self.disposition:
            return False
        if self.direction is not None and record.get("direction") != self.direction:
            return False
        if self.number is not None and self.number not in record_numbers(record):
            return False
        return self.user is None or record_user(record) == self.user


@dataclass(frozen=True)
class Page:
    """A page of records, newest first, and the member to go on after (None: nothing left)."""

    records: list[Record]
    next_after: str | None


def member(record: Record) -> str:
    """A record's place in every index: its end time, fixed width, then its call id."""
    end_ms = min(max(record_end_ms(record) or 0, 0), LATEST_END_MS)
    return f"{end_ms:0{END_DIGITS}d}:{record['call_id']}"


def is_member(value: str) -> bool:
    """Whether `value` has a member's shape (what a cursor must decode to)."""
    head, sep, call_id = value.partition(":")
    return bool(sep and call_id) and len(head) == END_DIGITS and head.isascii() and head.isdigit()


def record_numbers(record: Record) -> set[str]:
    """The numbers a record is found by: `from.number` and `to.number`, as the live index."""
    found = set()
    for party in ("from", "to"):
        value = record.get(party)
        number = value.get("number") if isinstance(value, dict) else None
        if isinstance(number, str) and number:
            found.add(number)
    return found


def record_user(record: Record) -> str | None:
    user = record.get("request_from_user_id")
    return user if isinstance(user, str) and user else None


class History:
    """The records history of one deployment, over all its shards."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.shards)
        self.coordination = DrainCoordination(redis, settings)

    def index_keys(self, record: Record) -> set[str]:
        """Every index of its shard a record belongs to: by end time, number(s) and user."""
        shard = self.keys.shard_of(record["call_id"])
        found = {self.keys.history_by_end(shard)}
        found.update(self.keys.history_by(shard, "number", n) for n in record_numbers(record))
        user = record_user(record)
        if user is not None:
            found.add(self.keys.history_by(shard, "user", user))
        return found

    def queue_records(
        self,
        pipe: Pipeline,
        records: Iterable[Record],
        before: dict[str, Record | None],
        packed: Mapping[tuple[str, int], bytes] | None = None,
    ) -> None:
        """Queue on `pipe` (a commit's MULTI) the writing of record revisions: each call's last
        one replaces, in every index, the one stored before (`before`); the revisions between
        are never seen, the transaction being atomic. Commands are grouped by key, one per key
        and batch (the batch's calls share a shard), as most of a commit's cost is per command."""
        latest = {record["call_id"]: record for record in records}
        removed: dict[str, list[str]] = defaultdict(list)
        added: dict[str, dict[str, int]] = defaultdict(dict)
        stored: dict[str, dict[str, bytes]] = defaultdict(dict)
        for call_id, record in latest.items():
            place, keys = member(record), self.index_keys(record)
            previous = before.get(call_id)
            if previous is not None:
                old_place = member(previous)
                for key in self.index_keys(previous):
                    if key not in keys or old_place != place:
                        removed[key].append(old_place)
            shard = self.keys.shard_of(call_id)
            known = packed.get((call_id, record["revision"])) if packed else None
            stored[self.keys.history(shard)][call_id] = known or pack(dumps(record).encode())
            for key in keys:
                added[key][place] = 0
        for key, places in removed.items():
            for part in command_parts(places):
                pipe.zrem(key, *part)
        for key, values in stored.items():
            for fields in command_parts(list(values.items())):
                pipe.hset(key, mapping=dict(fields))
        for key, scores in added.items():
            for members in command_parts(list(scores.items())):
                pipe.zadd(key, dict(members))

    def previous(
        self, records: list[Record], known: dict[str, Record | None]
    ) -> dict[str, Record | None]:
        """What each call's records replace: `known` (the record its document held before the
        batch), else the history's own, read in one round trip: a call numbered on from a
        tombstone, and one started over at revision 1 once its document and tombstone expired
        (the history outlives both), must not leave its earlier index entries behind."""
        before = dict(known)
        unknown = {r["call_id"] for r in records if before.get(r["call_id"]) is None}
        if unknown:
            before.update(self.latest(sorted(unknown)))
        return before

    def latest(self, call_ids: Iterable[str]) -> dict[str, Record | None]:
        """The stored latest revision of each call's record: one HMGET per shard, in one round
        trip."""
        return {c: _record(raw) for c, raw in self._stored(list(call_ids)).items()}

    def _stored(self, call_ids: list[str]) -> dict[str, bytes | None]:
        by_shard: dict[int, list[str]] = defaultdict(list)
        for call_id in call_ids:
            by_shard[self.keys.shard_of(call_id)].append(call_id)
        pipe = self.redis.pipeline(transaction=False)
        for shard, ids in by_shard.items():
            pipe.hmget(self.keys.history(shard), ids)
        found: dict[str, bytes | None] = {}
        for ids, raws in zip(by_shard.values(), pipe.execute() if by_shard else [], strict=True):
            found.update(zip(ids, cast(list[bytes | None], raws), strict=True))
        return found

    def page(
        self, since_ms: int, until_ms: int | None, filters: Filters, limit: int, after: str | None
    ) -> Page:
        """Up to `limit` records that end in [since_ms, until_ms), newest first, after the
        member `after` (exclusive) when given. A page stops early, with a cursor, once it has
        examined `PAGE_BUDGET` members: filters without an index may match nothing for
        millions, and one request must not read them all."""
        found: list[Record] = []
        walk = self._walk(since_ms, until_ms, filters, after, limit)
        for examined, (place, record, last) in enumerate(walk, start=1):
            if record is not None:
                found.append(record)
            if last:
                break
            if len(found) == limit or examined >= PAGE_BUDGET:
                return Page(found, place)
        return Page(found, None)

    def iter_records(
        self, since_ms: int, until_ms: int | None, filters: Filters
    ) -> Iterator[Record]:
        """Every record that ends in [since_ms, until_ms) and passes `filters`, newest first,
        read a step at a time: memory stays that of one step, whatever the range holds."""
        for _, record, _ in self._walk(since_ms, until_ms, filters, None, WALK_STEP):
            if record is not None:
                yield record

    def count_at_most(self, since_ms: int, until_ms: int | None, filters: Filters) -> int:
        """How many records end in [since_ms, until_ms) in the index the filters pick (one
        pipelined ZLEXCOUNT per shard): an upper bound of what a walk yields."""
        lowest = f"[{_end_text(since_ms)}:" if since_ms > 0 else "-"
        upper = _upper_bound(until_ms, None)
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(self.settings.shards):
            pipe.zlexcount(self._index_key(shard, filters), lowest, upper)
        return sum(int(found) for found in pipe.execute())

    def _walk(
        self, since_ms: int, until_ms: int | None, filters: Filters, after: str | None, step: int
    ) -> Iterator[tuple[str, Record | None, bool]]:
        """(member, its record or None when stale or filtered out, whether nothing follows in
        the range) for every member, newest first: each step reads
        `step` members of every shard's index below the last one taken, in one pipeline, merges
        them, and fetches the records of the first `step` in a second; steps grow to
        `WALK_STEP`."""
        step = max(1, min(step, WALK_STEP))
        indexes = [self._index_key(shard, filters) for shard in range(self.settings.shards)]
        lowest = f"[{_end_text(since_ms)}:" if since_ms > 0 else "-"
        upper = _upper_bound(until_ms, after)
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for key in indexes:
                pipe.zrevrangebylex(key, upper, lowest, 0, step)
            per_shard = [[text(m) for m in found] for found in pipe.execute()]
            merged = list(heapq.merge(*per_shard, reverse=True))
            taken = merged[:step]
            exhausted = len(merged) <= step and all(len(found) < step for found in per_shard)
            records = self._records(taken)
            for n, place in enumerate(taken):
                record = records.get(place)
                last = exhausted and n == len(taken) - 1
                yield place, record if record is not None and filters.match(record) else None, last
            if exhausted or not taken:
                return
            upper = f"({taken[-1]}"
            step = min(2 * step, WALK_STEP)  # filters are skipping records: read more at once

    def _index_key(self, shard: int, filters: Filters) -> str:
        """The narrowest index that covers the filters; the rest are checked on the records."""
        if filters.number is not None:
            return self.keys.history_by(shard, "number", filters.number)
        if filters.user is not None:
            return self.keys.history_by(shard, "user", filters.user)
        return self.keys.history_by_end(shard)

    def _records(self, places: list[str]) -> dict[str, Record]:
        """The stored records of members, by member; a member whose call's latest record no
        longer sits there (a stale index entry) has none."""
        stored = self._stored([place.partition(":")[2] for place in places])
        found = {}
        for place in places:
            record = _record(stored[place.partition(":")[2]])
            if record is not None and member(record) == place:
                found[place] = record
        return found

    def trim(self, now_ms: int) -> int:
        """Drop the records that ended before the retention, every shard whose oldest is an
        hour past it, in bounded batches each under the shard's drain lock; return how many. A
        shard whose lock stays taken is left for the next run."""
        before_ms = now_ms - self.settings.record_retention_days * DAY_MS
        if before_ms <= 0:
            return 0
        removed = 0
        for shard in range(self.settings.shards):
            if not self._ended_before(shard, before_ms - TRIM_SLACK_MS):
                continue
            for _ in range(TRIM_BATCHES):
                count = self._trim_batch(shard, before_ms)
                removed += max(count, 0)
                if count < TRIM_BATCH:
                    break
        return removed

    def _ended_before(self, shard: int, before_ms: int) -> bool:
        end_key = self.keys.history_by_end(shard)
        return bool(self.redis.zrangebylex(end_key, "-", f"({_end_text(before_ms)}:", 0, 1))

    def _trim_batch(self, shard: int, before_ms: int) -> int:
        """One batch of the shard's oldest records, removed with every index entry in one
        transaction fenced on the shard's drain lock: no commit runs in between to write a
        revision the batch would drop. -1 if the lock could not be had."""
        if not self._ended_before(shard, before_ms):
            return 0  # nothing to drop: the drainers keep the lock
        token = uuid.uuid4().hex
        if not self._acquire(shard, token):
            return -1
        try:
            return self._trim_held(shard, before_ms, token)
        finally:
            self.coordination.locks.release(shard, token)

    def _trim_held(self, shard: int, before_ms: int, token: str) -> int:
        end_key, lock_key = self.keys.history_by_end(shard), self.keys.drain_lock(shard)
        oldest = self.redis.zrangebylex(end_key, "-", f"({_end_text(before_ms)}:", 0, TRIM_BATCH)
        places = [text(m) for m in oldest]
        if not places:
            return 0
        records = self._records(places)
        with watched_transaction(self.redis, lock_key) as pipe:
            try:
                pipe.watch(lock_key)  # type: ignore[no-untyped-call]
                if pipe.get(lock_key) != token.encode():
                    return -1
                pipe.multi()
                pipe.zrem(end_key, *places)
                for place, record in records.items():
                    pipe.hdel(self.keys.history(shard), record["call_id"])
                    for key in self.index_keys(record):
                        pipe.zrem(key, place)
                pipe.execute()
            except WatchError:
                return -1
        return len(places)

    def _acquire(self, shard: int, token: str) -> bool:
        """Take the shard's drain lock, waiting a little for the drain job to hand it over."""
        return self.coordination.locks.acquire_waiting(shard, token, LOCK_WAIT_SECONDS)


def _upper_bound(until_ms: int | None, after: str | None) -> str:
    """The exclusive top of a walk: below `until_ms`'s members, and below `after` if lower."""
    top = f"({_end_text(until_ms)}:" if until_ms is not None else "+"
    if after is None:
        return top
    return f"({after}" if top == "+" or after < top[1:] else top


def _end_text(ms: int) -> str:
    return f"{min(max(ms, 0), LATEST_END_MS):0{END_DIGITS}d}"


def _record(raw: bytes | None) -> Record | None:
    return cast(Record, json.loads(unpack(raw))) if raw else None


def command_parts(items: list[T]) -> Iterator[list[T]]:
    """`items` in slices a command of the commit script can carry (a rebuild's rewrite holds
    every record of a shard)."""
    for start in range(0, len(items), ITEMS_PER_COMMAND):
        yield items[start : start + ITEMS_PER_COMMAND]
