"""All reads and writes of callstate's Redis data: event log, call documents, indexes, records."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, cast

from redis import Redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from callstate import streamids
from callstate.calls import PROCESS_ERRORS, Applied, Doc, LogEntry, error_name, is_active
from callstate.codec import dumps, pack, pack_doc, unpack, unpack_doc
from callstate.config import Settings
from callstate.keys import Keys
from callstate.schema import CALL_ID_PATTERN, PayloadError, decode_logged

log = logging.getLogger(__name__)

# redis-py types replies as bytes-or-str (it cannot know decode_responses); RQ needs bytes.
StreamRows = list[tuple[bytes, dict[bytes, bytes]]]


# Log an event and claim its shard's wake flag for the drain job the caller will queue, as one
# command with one reply: the webhook's only Redis call. A flag whose job was never queued (a web
# process that died in between) is found out and replaced by maintenance.
APPEND_EVENT = """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
local claimed = redis.call('SET', KEYS[2], ARGV[1], 'NX')
return {id, claimed and 1 or 0}
"""


# Compare-and-delete and compare-and-set in one command each: unlike WATCH/MULTI they still run
# when Redis is at its memory limit (a transaction is refused there), so a drainer that failed
# for lack of memory does not leave its shard locked until the lock's TTL.
COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2])
    return 1
end
return 0
"""
COMPARE_AND_PEXPIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
REDIS_TIMEOUT_SECONDS = 5


def new_wake_id() -> str:
    """The id of the drain job a wake flag stands for; it carries the time it was made, so
    maintenance can tell a flag whose job was never queued from a fresh one."""
    return f"drain-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"


def wake_age_ms(wake_id: str) -> int:
    parts = wake_id.split("-")
    made_ms = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0
    return int(time.time() * 1000) - made_ms


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def connect(url: str) -> Redis:
    """A client that fails fast: redis-py's default retries back off for seconds, and a webhook
    that cannot store an event must answer 503 before the provider gives up on it.

    One immediate retry on a broken connection (a restarted server), none on a timeout: a
    command that timed out may have run, and an append run twice would log the event twice.
    """
    retry = Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,))
    return Redis.from_url(
        url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=2, retry=retry
    )


class Store:
    """callstate's Redis data, behind methods named for what they mean to a call."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.shards)
        self._append_event = redis.register_script(APPEND_EVENT)
        self._compare_and_delete = redis.register_script(COMPARE_AND_DELETE)
        self._compare_and_set = redis.register_script(COMPARE_AND_SET)
        self._compare_and_pexpire = redis.register_script(COMPARE_AND_PEXPIRE)

    # Event log -----------------------------------------------------------------------------

    def append_event(
        self, call_id: str, raw: bytes, signer: int | None = None
    ) -> tuple[str, int, str | None]:
        """Log a raw event (with the project whose own secret signed it, if one did); return
        its log id, its shard, and the wake id it claimed the flag for, if it did: the caller
        then queues the drain job of that id."""
        return self._append(call_id, event_fields(call_id, raw, signer))

    def append_sweep(self, call_id: str, stale_before_ms: int) -> tuple[str, int, str | None]:
        """Log a request to close a call that has been silent since before `stale_before_ms`;
        return as `append_event` does."""
        return self._append(call_id, {"call_id": call_id, "sweep_before_ms": stale_before_ms})

    def _append(
        self, call_id: str, fields: dict[FieldT, EncodableT]
    ) -> tuple[str, int, str | None]:
        shard, wake_id = self.keys.shard_of(call_id), new_wake_id()
        log_id, claimed = self._append_event(
            keys=[self.keys.log(shard), self.keys.wake(shard)],
            args=[wake_id, *(x for pair in fields.items() for x in pair)],
        )
        return _text(log_id), shard, wake_id if claimed else None

    def read_entries(
        self, shard: int, after: str | None, count: int, block_ms: int = 0
    ) -> list[LogEntry]:
        """Up to `count` entries logged after `after`; with `block_ms`, wait that long for one."""
        found = cast(
            list[tuple[bytes, StreamRows]] | None,
            self.redis.xread(
                {self.keys.log(shard): after or "0-0"}, count=count, block=block_ms or None
            ),
        )
        rows = found[0][1] if found else []
        return [_entry(log_id, fields) for log_id, fields in rows]

    def read_range(
        self, shard: int, after: str | None, upto: str | None, count: int
    ) -> list[LogEntry]:
        """Up to `count` entries logged after `after` and at or before `upto` (None: the end)."""
        rows = cast(
            StreamRows,
            self.redis.xrange(
                self.keys.log(shard), f"({after}" if after else "-", upto or "+", count=count
            ),
        )
        return [_entry(log_id, fields) for log_id, fields in rows]

    def iter_log(
        self, shard: int, batch: int, after: str | None = None, upto: str | None = None
    ) -> Iterator[list[LogEntry]]:
        """The shard's entries after `after` up to `upto`, in batches."""
        while entries := self.read_range(shard, after, upto, batch):
            yield entries
            after = entries[-1].log_id

    def payloads(self, call_id: str, log_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The logged payloads of one call's entries, by log id (absent once trimmed)."""
        log = self.keys.log(self.keys.shard_of(call_id))
        pipe = self.redis.pipeline(transaction=False)
        for log_id in log_ids:
            pipe.xrange(log, log_id, log_id)
        found: dict[str, dict[str, Any]] = {}
        replies: list[StreamRows] = pipe.execute()
        for rows in replies:
            for raw_id, fields in rows:
                entry = _entry(raw_id, fields)
                found[entry.log_id] = entry.payload
        return found

    def cursor(self, shard: int) -> str | None:
        raw = self.redis.get(self.keys.cursor(shard))
        return _text(raw) if raw else None

    def last_log_id(self, shard: int) -> str | None:
        rows = cast(StreamRows, self.redis.xrevrange(self.keys.log(shard), "+", "-", count=1))
        return _text(rows[0][0]) if rows else None

    def first_log_id(self, shard: int) -> str | None:
        rows = cast(StreamRows, self.redis.xrange(self.keys.log(shard), "-", "+", count=1))
        return _text(rows[0][0]) if rows else None

    def has_backlog(self, shard: int) -> bool:
        last = self.last_log_id(shard)
        if last is None:
            return False
        cursor = self.cursor(shard)
        return cursor is None or streamids.parse(last) > streamids.parse(cursor)

    # Drain coordination --------------------------------------------------------------------

    def claim_wake(self, shard: int) -> str | None:
        """Set the shard's wake flag unless a drain job is queued; a wake id returned obliges
        the caller to queue the drain job of that id."""
        wake_id = new_wake_id()
        return wake_id if self.redis.set(self.keys.wake(shard), wake_id, nx=True) else None

    def clear_wake(self, shard: int, wake_id: str) -> None:
        """The drain job `wake_id` has started: it is no longer queued, so the next event must
        queue one. A flag that names another job is not this job's to clear."""
        self._compare_and_delete(keys=[self.keys.wake(shard)], args=[wake_id])

    def wake_holder(self, shard: int) -> str | None:
        """The id of the drain job the shard's wake flag stands for, if it is set."""
        raw = self.redis.get(self.keys.wake(shard))
        return _text(raw) if raw else None

    def replace_wake(self, shard: int, old: str) -> str | None:
        """Make the flag stand for a new drain job if it still stands for `old`; return its id."""
        wake_id = new_wake_id()
        replaced = self._compare_and_set(keys=[self.keys.wake(shard)], args=[old, wake_id])
        return wake_id if replaced else None

    def acquire_drain_lock(self, shard: int, token: str) -> bool:
        ms = self.settings.drain_lock_seconds * 1000
        return bool(self.redis.set(self.keys.drain_lock(shard), token, nx=True, px=ms))

    def renew_drain_lock(self, shard: int, token: str) -> bool:
        """Extend the lock to its full time if `token` still holds it."""
        ms = self.settings.drain_lock_seconds * 1000
        return bool(self._compare_and_pexpire(keys=[self.keys.drain_lock(shard)], args=[token, ms]))

    def release_drain_lock(self, shard: int, token: str) -> bool:
        """Delete the lock only if `token` still holds it (it may have expired and moved on)."""
        return bool(self._compare_and_delete(keys=[self.keys.drain_lock(shard)], args=[token]))

    # Call documents ------------------------------------------------------------------------

    def load_docs(self, call_ids: Iterable[str]) -> dict[str, Doc | None]:
        ids = list(call_ids)
        if not ids:
            return {}
        raws = self.redis.mget([self.keys.call(call_id) for call_id in ids])
        return {
            call_id: unpack_doc(cast(bytes, raw)) if raw else None
            for call_id, raw in zip(ids, raws, strict=True)
        }

    def get_doc(self, call_id: str) -> Doc | None:
        return self.load_docs([call_id])[call_id]

    def all_call_ids(self) -> set[str]:
        prefix_len = len(self.keys.call(""))
        return {
            key.decode()[prefix_len:]
            for key in self.redis.scan_iter(match=self.keys.call_pattern(), count=1000)
        }

    def index_keys(self, doc: Doc | None) -> set[str]:
        """The lookup indexes an active call belongs to: its numbers and its user."""
        if doc is None or not is_active(doc):
            return set()
        fields = doc["fields"]
        found = set()
        for party in ("from", "to"):
            number = _text_field(fields.get(party), "number")
            if number:
                found.add(self.keys.active_by("number", number))
        user = _text_field(fields, "request_from_user_id")
        if user:
            found.add(self.keys.active_by("user", user))
        return found

    def commit(
        self,
        shard: int,
        expected_cursor: str | None,
        new_cursor: str,
        entries: int,
        applied: Applied,
        indexed_before: dict[str, set[str]],
    ) -> bool:
        """Write a batch's documents, indexes, records and the new cursor in one transaction.

        The transaction only runs if the cursor is still `expected_cursor`, so a batch can never be
        applied twice, even by a drainer that lost its lock while it worked.
        """
        cursor_key = self.keys.cursor(shard)
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(cursor_key)  # type: ignore[no-untyped-call]
                current = pipe.get(cursor_key)
                if (_text(current) if current else None) != expected_cursor:
                    return False
                pipe.multi()
                for call_id, doc in applied.docs.items():
                    self.write_doc(pipe, doc, applied.packed[call_id], indexed_before[call_id])
                for record in applied.records:
                    pipe.xadd(
                        self.keys.records(),
                        {"call_id": record["call_id"], "record": dumps(record)},
                        maxlen=self.settings.records_stream_maxlen,
                        approximate=True,
                    )
                pipe.set(cursor_key, new_cursor)
                pipe.incrby(self.keys.applied_counter(), entries)
                if applied.unprocessable:
                    pipe.incrby(self.keys.unprocessable_counter(shard), len(applied.unprocessable))
                if applied.expired:
                    pipe.incrby(self.keys.expired_counter(shard), len(applied.expired))
                # Renews the drainer's lock; if it was lost, the cursor check above already fences.
                pipe.pexpire(self.keys.drain_lock(shard), self.settings.drain_lock_seconds * 1000)
                pipe.execute()
                return True
            except WatchError:
                return False

    def write_doc(self, pipe: Pipeline, doc: Doc, packed: bytes, indexed_before: set[str]) -> None:
        """Queue a document's write and its index updates on `pipe`."""
        self._set_doc(pipe, doc, packed)
        self._index(pipe, doc, indexed_before)

    def _set_doc(self, pipe: Pipeline, doc: Doc, packed: bytes) -> None:
        expiry_ms = None if is_active(doc) else self._expiry_ms()
        pipe.set(self.keys.call(doc["call_id"]), packed, px=expiry_ms)

    def _index(self, pipe: Pipeline, doc: Doc, indexed_before: set[str]) -> None:
        call_id = doc["call_id"]
        indexed_now = self.index_keys(doc)
        for key in indexed_before - indexed_now:
            pipe.zrem(key, call_id)
        if is_active(doc):
            score = {call_id: doc["last_received_ms"]}
            pipe.zadd(self.keys.active(), score)
            for key in indexed_now:
                pipe.zadd(key, score)
        else:
            pipe.zrem(self.keys.active(), call_id)

    def rewrite(
        self,
        cursors: dict[int, str | None],
        docs: dict[str, Doc],
        active: dict[str, Doc],
    ) -> bool:
        """Write `callstate rebuild`'s documents and every
        active-call index anew, only if no shard's cursor moved from `cursors`. The cursors are
        rewritten too, so a drainer that lost its lock cannot commit what it read before."""
        cursor_keys = {shard: self.keys.cursor(shard) for shard in cursors}
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(*cursor_keys.values())  # type: ignore[no-untyped-call]
                for shard, key in cursor_keys.items():
                    current = pipe.get(key)
                    if (_text(current) if current else None) != cursors[shard]:
                        return False
                indexes = list(self.redis.scan_iter(match=self.keys.active_index_pattern()))
                pipe.multi()
                pipe.delete(self.keys.active(), *indexes)
                for doc in docs.values():
                    self._set_doc(pipe, doc, pack_doc(doc))
                for doc in active.values():
                    self._index(pipe, doc, set())
                for shard, key in cursor_keys.items():
                    if cursors[shard] is not None:
                        pipe.set(key, cast(str, cursors[shard]))
                pipe.execute()
                return True
            except WatchError:
                return False

    def _expiry_ms(self) -> int:
        """A call that is not active is retired by its shard's snapshot once its last entry
        ages out of the log; the TTL, twice as long, only frees memory if maintenance stops."""
        return 2 * self.settings.retention_seconds * 1000

    # Lookups -------------------------------------------------------------------------------

    def active_calls(
        self, number: str | None, user: str | None, offset: int, limit: int
    ) -> tuple[int, list[Doc]]:
        """Active calls, most recently heard from first, optionally by number and/or user."""
        keys = []
        if number:
            keys.append(self.keys.active_by("number", number))
        if user:
            keys.append(self.keys.active_by("user", user))
        ids: list[bytes]
        if len(keys) == 2:
            ranked = cast(list[tuple[bytes, float]], self.redis.zinter(keys, withscores=True))
            ranked.sort(key=lambda pair: (-pair[1], pair[0]))
            total = len(ranked)
            ids = [member for member, _ in ranked[offset : offset + limit]]
        else:
            key = keys[0] if keys else self.keys.active()
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcard(key)
            pipe.zrevrange(key, offset, offset + limit - 1)
            total, ids = pipe.execute()
        docs = self.load_docs(_text(member) for member in ids)
        return total, [doc for doc in docs.values() if doc is not None]

    def stale_call_ids(self, before_ms: int, limit: int) -> list[str]:
        ids = self.redis.zrangebyscore(self.keys.active(), "-inf", f"({before_ms}", 0, limit)
        return [_text(member) for member in cast(list[bytes], ids)]

    def applied_count(self) -> int:
        return int(self.redis.get(self.keys.applied_counter()) or 0)

    def server_time_ms(self) -> int:
        seconds, micros = self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # Quarantine ----------------------------------------------------------------------------

    def quarantine(self, item: dict[str, Any]) -> None:
        """Keep a rejected delivery for inspection; best effort, the list is bounded."""
        try:
            pipe = self.redis.pipeline(transaction=True)
            # ASCII escapes: a rejected body's text may not even be encodable as UTF-8.
            pipe.lpush(self.keys.quarantine(), json.dumps(item))
            pipe.ltrim(self.keys.quarantine(), 0, self.settings.quarantine_max - 1)
            pipe.execute()
        except RedisError as exc:
            log.warning("rejected delivery not quarantined: %s", exc)

    def quarantined(self, limit: int) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.redis.lrange(self.keys.quarantine(), 0, limit - 1)]


def event_fields(call_id: str, raw: bytes, signer: int | None = None) -> dict[FieldT, EncodableT]:
    """A webhook delivery as a log entry: its call, the body as received, packed, and the
    project whose own secret signed it, if one did."""
    fields: dict[FieldT, EncodableT] = {"call_id": call_id, "event": pack(raw)}
    if signer is not None:
        fields["signer"] = signer
    return fields


def _entry(raw_id: bytes, fields: dict[bytes, bytes]) -> LogEntry:
    """Decode a log entry; one that cannot be decoded comes back with its `problem` named."""
    log_id = raw_id.decode()
    call_id = fields.get(b"call_id", b"").decode("utf-8", "replace")
    if not CALL_ID_PATTERN.fullmatch(call_id):
        return LogEntry(log_id, call_id, {}, problem="invalid_call_id")
    try:
        if b"sweep_before_ms" in fields:
            return LogEntry(log_id, call_id, {}, int(fields[b"sweep_before_ms"]))
        raw = unpack(fields[b"event"])
        payload = decode_logged(raw)
    except PayloadError as exc:
        return LogEntry(log_id, call_id, {}, problem=exc.error)
    except PROCESS_ERRORS:
        raise
    except Exception as exc:  # anything else a malformed entry raises names it; nothing stops
        return LogEntry(log_id, call_id, {}, problem=error_name(exc))
    signer = int(fields[b"signer"]) if b"signer" in fields else None
    return LogEntry(log_id, call_id, payload, size=len(raw), signer=signer)


def _text_field(container: Any, name: str) -> str | None:
    value = container.get(name) if isinstance(container, dict) else None
    return value if isinstance(value, str) else None
