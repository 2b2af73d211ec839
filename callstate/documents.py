"""Call documents, the active-call indexes, and the batch commit that writes them with the
records and the cursor in one transaction."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.typing import EncodableT

from callstate.boardview import RESET_HINT, queue_board_update
from callstate.calldoc import Record
from callstate.calls import Applied, Doc, is_active
from callstate.codec import dumps, pack, pack_doc, unpack_doc
from callstate.config import Settings
from callstate.connection import command_list, get_many, text
from callstate.history import History, command_parts
from callstate.keys import Keys
from callstate.lag import COUNT_APPLY_LAG, entry_millis
from callstate.retention import Retention

# A batch's commit, run alone: its writes run only if the shard's cursor is still where the
# batch started and its drain lock still holds the drainer's token, so a drainer that lost its
# lock, or whose batch someone else applied, writes nothing; the apply lag of every entry is
# counted at the same moment. KEYS: cursor, lock, apply-lag hash. ARGV: the expected cursor (""
# for none), the token, the number of entry times and the times, then each write as its
# number of arguments and its arguments.
COMMIT = (
    COUNT_APPLY_LAG
    + """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
local entries = tonumber(ARGV[3])
count_apply_lag(KEYS[3], ARGV, 4, 3 + entries)
local i = 4 + entries
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""
)


@dataclass(frozen=True)
class Prior:
    """What a document was indexed and counted under before a batch changed it."""

    indexes: frozenset[str]
    active_status: str | None
    record: Record | None = None


class Documents:
    """The call documents and what is derived with them: indexes, records, counters."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self._commit = redis.register_script(COMMIT)
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.shards)
        self.retention = Retention.of(settings)
        self.history = History(redis, settings)

    def load_docs(self, call_ids: Iterable[str]) -> dict[str, Doc | None]:
        packed = self.load_packed(list(call_ids))
        return {c: unpack_doc(raw) if raw else None for c, raw in packed.items()}

    def load_packed(self, call_ids: list[str]) -> dict[str, bytes | None]:
        """Documents in their stored form, for comparing without unpacking."""
        if not call_ids:
            return {}
        raws = get_many(self.redis, [self.keys.call(call_id) for call_id in call_ids])
        return dict(zip(call_ids, raws, strict=True))

    def get_doc(self, call_id: str) -> Doc | None:
        return self.load_docs([call_id])[call_id]

    def all_call_ids(self) -> set[str]:
        found = self.redis.scan_iter(match=self.keys.per_call_pattern("call"), count=1000)
        return {
            call_id
            for key in found
            if (call_id := self.keys.per_call_id("call", text(key))) is not None
        }

    def prior(self, doc: Doc | None) -> Prior:
        """Take note of a document's indexes and active status before a batch changes it."""
        status = doc["status"] if doc is not None and is_active(doc) else None
        record = doc["record"] if doc is not None else None
        return Prior(frozenset(self.index_keys(doc)), status, record)

    def index_keys(self, doc: Doc | None) -> set[str]:
        """The lookup indexes an active call belongs to: its numbers and its user."""
        if doc is None or not is_active(doc):
            return set()
        fields, shard = doc["fields"], self.keys.shard_of(doc["call_id"])
        found = set()
        for party in ("from", "to"):
            number = _text_field(fields.get(party), "number")
            if number:
                found.add(self.keys.active_by(shard, "number", number))
        user = _text_field(fields, "request_from_user_id")
        if user:
            found.add(self.keys.active_by(shard, "user", user))
        return found

    def commit(
        self,
        shard: int,
        token: str,
        expected_cursor: str | None,
        log_ids: list[str],
        applied: Applied,
        prior: dict[str, Prior],
    ) -> bool:
        """Write a batch's documents, indexes, records, counters and the new cursor (the last of
        `log_ids`, the batch's entries) in one script, run alone, so the counters are exact.

        The transaction only runs if the cursor is still `expected_cursor` and the shard's drain
        lock still holds `token`: a drainer that lost its lock while it worked commits nothing,
        so it cannot apply a batch twice, nor write over what a snapshot step or a rebuild that
        took the lock wrote since it read.
        """
        cursor_key, lock_key = self.keys.cursor(shard), self.keys.drain_lock(shard)
        recorded = {call_id: before.record for call_id, before in prior.items()}
        replaced = self.history.previous(applied.records, recorded)
        # Queued here, run by the commit script: one round trip, and no WATCH to set up.
        writes = command_list()
        for call_id, doc in applied.docs.items():
            before = prior[call_id]
            self.write_doc(writes, doc, applied.packed[call_id], before.indexes)
            self._count_active(writes, shard, before.active_status, doc)
        packed: dict[tuple[str, int], bytes] = {}
        for record in applied.records:
            published = dumps(record)
            writes.xadd(
                self.keys.records(shard),
                {"call_id": record["call_id"], "record": published},
                maxlen=self.settings.records_stream_maxlen,
                approximate=True,
            )
            # Packed once for the history and the outbox: a quarter of the bytes.
            packed[record["call_id"], record["revision"]] = pack(published.encode())
            self._owe_delivery(writes, shard, record, packed)
        self.history.queue_records(writes, applied.records, replaced, packed)
        writes.set(cursor_key, log_ids[-1])
        self._count_batch(writes, shard, log_ids, applied)
        for call_id, (tombstone, reopened_ms) in applied.reopened.items():
            keep_until = self.retention.tombstone_expires_after(reopened_ms)
            writes.set(self.keys.tombstone(call_id), tombstone.text(), pxat=keep_until)
        queue_board_update(writes, self.keys, shard, applied, expected_cursor)
        writes.pexpire(lock_key, self.settings.drain_lock_seconds * 1000)
        millis = entry_millis(log_ids)
        committed = self._commit(
            keys=[cursor_key, lock_key, self.keys.apply_lag(shard)],
            args=[expected_cursor or "", token, len(millis), *millis, *_flattened(writes)],
        )
        return bool(committed)

    def _owe_delivery(
        self, pipe: Pipeline, shard: int, record: Record, packed: dict[tuple[str, int], bytes]
    ) -> None:
        """With forwarding on, a published revision goes to the shard's outbox too, in the
        commit that publishes it: never committed without its delivery owed. No trim: every
        entry is owed until the forwarder hands it over."""
        if self.settings.forwarding:
            pipe.xadd(
                self.keys.outbox(shard),
                {
                    "call_id": record["call_id"],
                    "revision": str(record["revision"]),
                    "record": packed[record["call_id"], record["revision"]],
                },
            )

    def _count_batch(
        self, pipe: Pipeline, shard: int, log_ids: list[str], applied: Applied
    ) -> None:
        pipe.incrby(self.keys.applied_counter(shard), len(log_ids))
        for verdict, count in applied.verdicts.items():
            pipe.hincrby(self.keys.verdicts(shard), verdict, count)
        if applied.records:
            pipe.incrby(self.keys.records_counter(shard), len(applied.records))

    def _count_active(self, pipe: Pipeline, shard: int, was: str | None, doc: Doc) -> None:
        now = doc["status"] if is_active(doc) else None
        if was == now:
            return
        if was is not None:
            pipe.hincrby(self.keys.active_statuses(shard), was, -1)
        if now is not None:
            pipe.hincrby(self.keys.active_statuses(shard), now, 1)

    def write_doc(
        self, pipe: Pipeline, doc: Doc, packed: bytes, indexed_before: frozenset[str]
    ) -> None:
        """Queue a document's write and its index updates on `pipe`."""
        self._set_doc(pipe, doc, packed)
        self._index(pipe, doc, indexed_before)

    def _set_doc(self, pipe: Pipeline, doc: Doc, packed: bytes) -> None:
        expiry_ms = None if is_active(doc) else self.retention.document_ttl_ms()
        pipe.set(self.keys.call(doc["call_id"]), packed, px=expiry_ms)

    def _index(self, pipe: Pipeline, doc: Doc, indexed_before: frozenset[str]) -> None:
        call_id = doc["call_id"]
        active = self.keys.active(self.keys.shard_of(call_id))
        indexed_now = self.index_keys(doc)
        for key in indexed_before - indexed_now:
            pipe.zrem(key, call_id)
        if is_active(doc):
            score = {call_id: doc["last_received_ms"] or 0}
            pipe.zadd(active, score)
            for key in indexed_now:
                pipe.zadd(key, score)
        else:
            pipe.zrem(active, call_id)

    def rewrite(
        self,
        token: str,
        shard: int,
        cursor: str | None,
        docs: dict[str, Doc],
        active: dict[str, Doc],
    ) -> bool:
        """Write `callstate rebuild`'s documents of one shard and its active-call indexes and
        counts anew, only if the shard's drain lock still holds `token` and its cursor is still
        `cursor`; its open boards are told to reload. Run by the commit script (one per shard,
        as a cluster runs a script in one hash slot), so a lock renewal cannot fail it."""
        # Indexes are only written under the lock this caller holds: none appears meanwhile.
        indexes = list(
            self.redis.scan_iter(match=self.keys.active_index_pattern(shard), count=1000)
        )
        records = [doc["record"] for doc in docs.values() if doc["record"] is not None]
        # Read under the same lock: only its holder writes the shard's history.
        recorded = self.history.latest(record["call_id"] for record in records)
        writes = command_list()
        writes.delete(self.keys.active(shard), self.keys.active_statuses(shard))
        for part in command_parts(indexes):
            writes.delete(*part)
        for doc in docs.values():
            self._set_doc(writes, doc, pack_doc(doc))
        self.history.queue_records(writes, records, recorded)
        for doc in active.values():
            self._index(writes, doc, frozenset())
            self._count_active(writes, shard, None, doc)
        writes.publish(self.keys.board_channel(shard), RESET_HINT)
        written = self._commit(
            keys=[self.keys.cursor(shard), self.keys.drain_lock(shard), self.keys.apply_lag(shard)],
            args=[cursor or "", token, 0, *_flattened(writes)],
        )
        return bool(written)

    def active_calls(
        self, number: str | None, user: str | None, offset: int, limit: int
    ) -> tuple[int, list[Doc]]:
        """Active calls, most recently heard from first, optionally by number and/or user: each
        shard's first `offset + limit` in one round trip, merged. A later page counts first (one
        more round trip): past the end, it reads no call instead of every shard's all."""
        both = bool(number and user)
        indexes = [self._active_keys(shard, number, user) for shard in range(self.settings.shards)]
        if offset and not both:
            counting = self.redis.pipeline(transaction=False)
            for keys in indexes:
                counting.zcard(keys[0])
            total = sum(int(n) for n in counting.execute())
            if offset >= total:
                return total, []
        pipe = self.redis.pipeline(transaction=False)
        for keys in indexes:
            if both:
                pipe.zinter(keys, withscores=True)
            else:
                pipe.zcard(keys[0])
                pipe.zrevrange(keys[0], 0, offset + limit - 1, withscores=True)
        total, ranked = _merged_ranks(pipe.execute(), both=both)
        page = itertools.islice(ranked, offset, offset + limit)
        docs = self.load_docs(text(member) for member, _ in page)
        return total, [doc for doc in docs.values() if doc is not None]

    def _active_keys(self, shard: int, number: str | None, user: str | None) -> list[str]:
        """The shard's sorted sets a listing reads: by number and/or user, else every call."""
        keys = []
        if number:
            keys.append(self.keys.active_by(shard, "number", number))
        if user:
            keys.append(self.keys.active_by(shard, "user", user))
        return keys or [self.keys.active(shard)]

    def stale_call_ids(self, before_ms: int, limit: int) -> list[str]:
        """Up to `limit` active calls last heard from before `before_ms`, the longest silent
        first."""
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(self.settings.shards):
            pipe.zrangebyscore(
                self.keys.active(shard), "-inf", f"({before_ms}", 0, limit, withscores=True
            )
        oldest = heapq.merge(*pipe.execute(), key=_rank)
        return [text(member) for member, _ in itertools.islice(oldest, limit)]

    def applied_count(self) -> int:
        """Entries applied over all shards."""
        counters = [self.keys.applied_counter(shard) for shard in range(self.settings.shards)]
        return sum(int(raw or 0) for raw in get_many(self.redis, counters))


def _merged_ranks(replies: list[Any], both: bool) -> tuple[int, Iterator[tuple[bytes, float]]]:
    """The shards' replies of `active_calls` as one total and one ranking, most recent first
    (ties by id, the later first, as ZREVRANGE orders them): each shard's is in that order
    already, so they are merged, not sorted."""
    if both:
        rows = [sorted(found, key=_rank, reverse=True) for found in replies]
        total = sum(len(found) for found in rows)
    else:
        total = sum(int(n) for n in replies[0::2])
        rows = replies[1::2]
    return total, heapq.merge(*rows, key=_rank, reverse=True)


def _rank(pair: tuple[bytes, float]) -> tuple[float, bytes]:
    """A sorted-set member's place: by score, then by member, as Redis orders ties."""
    member, score = pair
    return score, member


def _text_field(container: Any, name: str) -> str | None:
    value = container.get(name) if isinstance(container, dict) else None
    return value if isinstance(value, str) else None


def _flattened(writes: Pipeline) -> list[EncodableT]:
    """The commands queued on `writes`, each as its number of arguments and its arguments."""
    flat: list[EncodableT] = []
    for args, _ in writes.command_stack:
        flat += [len(args), *args]
    return flat
