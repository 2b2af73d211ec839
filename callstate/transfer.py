"""Moving a store to another Redis, or to another number of logical shards: `callstate
export-store` writes a drained store as JSON Lines, `callstate import-store` reads it into an
empty one whose CALLSTATE_SHARDS may differ.

What moves is what the log cannot re-derive and what it re-derives from: each shard's log and
snapshot copies, the call documents, tombstones, records streams, records history, forwarding
outboxes and dead letters, the quarantine and the counters, each to its call's shard under the
target's shard count. The active-call indexes and counts and the history's indexes are derived
anew from what moved, by the commit's own code. Locks, wake flags, RQ's jobs and the records
streams' consumer groups are not moved: the source is drained and its workers stopped first.

Log ids keep their time. When shards merge, entries logged in the same millisecond in two
source shards would share an id in one target log, so the later ones take the next free
sequence number (never a lower id than they had) and the documents' journals are rewritten to
match: each call's journal and log entries agree, as `rebuild --check` requires. Every target
shard's cursor, and its log's last id, is set to the latest id any shard gave, so the
target's new events come after every imported one.

Every write names one shard's keys (or a global one), in pipelines of single-key commands: the
import runs on Redis Cluster too.
"""

from __future__ import annotations

import base64
import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ResponseError

from callstate import streamids
from callstate.calls import Doc, is_active
from callstate.codec import pack_doc, unpack, unpack_doc_or_empty
from callstate.connection import StreamRows, distinct, text
from callstate.health import workers_running
from callstate.keys import Keys
from callstate.rebuild import first_log_id
from callstate.snapshots import HISTORY_TRIMMED, Snapshot
from callstate.store import Store
from callstate.streamids import StreamId

FORMAT = "callstate-store"
VERSION = 1
READ_BATCH = 1000
# Commands queued before a pipeline is sent: bounded memory, few round trips.
WRITE_BATCH = 1000
# What a delivery that waited in an RQ job of the source becomes: a dead letter, which
# `callstate records redeliver` sends once the target runs (RQ's jobs do not move).
PENDING_PROBLEM = "waiting for a retry when the store was exported"
# The streams a shard has, by the name their lines carry; each is carried in id order.
STREAMS = ("log", "records", "outbox")
LAST_ID = 2**64 - 1


class TransferError(Exception):
    """A refusal, said to the operator: the source is not drained, the target is not empty, the
    file is not a whole export."""


def not_drained(store: Store) -> str | None:
    """Why the store cannot be exported yet, if it cannot: workers registered, a shard held, or
    entries logged and not applied (their effects would be lost: the export carries the log
    and the documents as applied, and the target's cursor says all is applied)."""
    if workers_running(store):
        return "stop the workers first (RQ lists some as running)"
    keys = store.keys
    for shard in range(keys.shards):
        if store.redis.exists(keys.drain_lock(shard)):
            return (
                f"shard {shard} is held (a drain job, snapshot step, trim or rebuild runs, or "
                f"one was killed: its lock expires within CALLSTATE_DRAIN_LOCK_SECONDS)"
            )
        if store.log.has_backlog(shard):
            return (
                f"shard {shard} has entries logged and not applied: stop the web, let the "
                f"workers apply the backlog (`callstate stats`: backlog 0), then stop them"
            )
    return None


@dataclass(frozen=True)
class ShardState:
    """Where a shard stands: a store that changes under the export changes one of these."""

    cursor: str | None
    position: str | None
    last_id: str | None


def _shard_state(store: Store, shard: int) -> ShardState:
    keys = store.keys
    position = store.redis.get(keys.snapshot_position(shard))
    return ShardState(
        store.log.cursor(shard),
        text(cast(bytes, position)) if position else None,
        _last_generated(store.redis, keys.log(shard)),
    )


def _store_state(store: Store) -> tuple[list[ShardState], int]:
    """Every shard's state, and how many deliveries were ever quarantined: a web process still
    running that refuses one writes the quarantine and nothing of any shard."""
    quarantined = store.redis.get(store.keys.quarantined_counter())
    states = [_shard_state(store, shard) for shard in range(store.keys.shards)]
    return states, int(cast(bytes, quarantined) or 0)


def _last_generated(redis: Redis, key: str) -> str | None:
    """The last id the stream ever gave, deleted or trimmed entries included."""
    try:
        info = redis.xinfo_stream(key)
    except ResponseError:  # no such stream
        return None
    return text(info["last-generated-id"])


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


@dataclass(frozen=True)
class _Row:
    """One stream entry of one shard, ordered by id, then shard."""

    order: tuple[StreamId, int]
    shard: int
    entry_id: str
    fields: dict[bytes, bytes]


def _stream(redis: Redis, key: str, shard: int) -> Iterator[_Row]:
    after = "-"
    while rows := cast(StreamRows, redis.xrange(key, after, "+", count=READ_BATCH)):
        for raw_id, fields in rows:
            entry_id = text(raw_id)
            yield _Row((streamids.parse(entry_id), shard), shard, entry_id, fields)
        after = f"({text(rows[-1][0])}"


class Exporter:
    """Reads a drained store, shard by shard, as the lines of an export."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys
        self.redis = store.redis
        self.now_ms = store.log.server_time_ms()
        self.vanished: Counter[str] = Counter()

    def counts(self) -> Counter[str]:
        """How many lines of each kind the export will have: the importer checks them."""
        keys, redis, queue = self.keys, self.redis, self.store.queue_redis
        shards = range(keys.shards)
        found = Counter({"shard": keys.shards, "counters": keys.shards, "quarantined": 1})
        found["quarantine"] = int(redis.llen(keys.quarantine()))
        for shard in shards:
            found["log"] += int(redis.xlen(keys.log(shard)))
            found["records"] += int(redis.xlen(keys.records(shard)))
            found["outbox"] += int(redis.xlen(keys.outbox(shard)))
            found["snapshot"] += int(redis.hlen(keys.snapshot(shard)))
            found["history"] += int(redis.hlen(keys.history(shard)))
            found["dead_letter"] += int(queue.llen(keys.dead_letters(shard)))
            found["pending"] += int(queue.hlen(keys.forward_pending(shard)))
        for kind in ("call", "tombstone"):
            found[kind] = sum(1 for _ in self._per_call_keys(kind))
        return +found

    def lines(self) -> Iterator[dict[str, Any]]:
        keys, redis, queue = self.keys, self.redis, self.store.queue_redis
        shards = range(keys.shards)
        for shard in shards:
            state = _shard_state(self.store, shard)
            yield {"kind": "shard", "shard": shard, **state.__dict__}
        # Every stream in id order over all shards: the importer numbers merged shards' entries
        # as it reads them, with no need to hold a log in memory.
        for name, key_of in (("log", keys.log), ("records", keys.records), ("outbox", keys.outbox)):
            merged = heapq.merge(
                *(_stream(redis, key_of(shard), shard) for shard in shards),
                key=lambda row: row.order,
            )
            for row in merged:
                yield {
                    "kind": name,
                    "shard": row.shard,
                    "id": row.entry_id,
                    "fields": {text(k): _b64(v) for k, v in row.fields.items()},
                }
        for shard in shards:
            for call_id, packed in redis.hscan_iter(keys.snapshot(shard), count=READ_BATCH):
                yield {"kind": "snapshot", "call_id": text(call_id), "doc": _b64(packed)}
        yield from self._expiring("call")
        yield from self._expiring("tombstone")
        for shard in shards:
            for call_id, packed in redis.hscan_iter(keys.history(shard), count=READ_BATCH):
                yield {"kind": "history", "call_id": text(call_id), "record": _b64(packed)}
        for shard in shards:
            letters = cast(list[bytes], queue.lrange(keys.dead_letters(shard), 0, -1))
            for letter in reversed(letters):  # oldest first: the importer pushes each at the head
                yield {"kind": "dead_letter", "letter": text(letter)}
            pending = cast(dict[bytes, bytes], queue.hgetall(keys.forward_pending(shard)))
            for job_id, delivery in sorted(pending.items()):
                yield {"kind": "pending", "job": text(job_id), "delivery": text(delivery)}
        items = cast(list[bytes], redis.lrange(keys.quarantine(), 0, -1))
        for item in reversed(items):
            yield {"kind": "quarantine", "item": text(item)}
        yield {"kind": "quarantined", "count": int(redis.get(keys.quarantined_counter()) or 0)}
        for shard in shards:
            yield self._counters(shard)

    def _per_call_keys(self, kind: str) -> Iterator[tuple[str, str]]:
        """Each key of `kind` (`call`, `tombstone`) with its call."""
        for raw in self.redis.scan_iter(match=self.keys.per_call_pattern(kind), count=READ_BATCH):
            key = text(raw)
            if (call_id := self.keys.per_call_id(kind, key)) is not None:
                yield key, call_id

    def _expiring(self, kind: str) -> Iterator[dict[str, Any]]:
        """Keys read with when they expire (absolute, on Redis' clock), a chunk at a time; one
        that expired since it was counted is noted, so the count still adds up."""
        chunk: list[tuple[str, str]] = []
        for found in self._per_call_keys(kind):
            chunk.append(found)
            if len(chunk) == READ_BATCH:
                yield from self._read_expiring(kind, chunk)
                chunk = []
        yield from self._read_expiring(kind, chunk)

    def _read_expiring(self, kind: str, chunk: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        pipe = self.redis.pipeline(transaction=False)
        for key, _ in chunk:
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute() if chunk else []
        for (_, call_id), value, ttl in zip(chunk, replies[0::2], replies[1::2], strict=True):
            if value is None:
                self.vanished[kind] += 1
                continue
            expires = self.now_ms + int(ttl) if int(ttl) >= 0 else None
            yield {
                "kind": kind,
                "call_id": call_id,
                "value": _b64(value),
                "expires_at_ms": expires,
            }

    def _counters(self, shard: int) -> dict[str, Any]:
        keys, redis = self.keys, self.redis
        pipe = redis.pipeline(transaction=False)
        pipe.get(keys.logged_counter(shard))
        pipe.get(keys.applied_counter(shard))
        pipe.get(keys.records_counter(shard))
        pipe.hgetall(keys.verdicts(shard))
        pipe.hgetall(keys.drain_seconds(shard))
        pipe.hgetall(keys.apply_lag(shard))
        logged, applied, records, verdicts, drain, lag = pipe.execute()
        forwarding = self.store.queue_redis.hgetall(keys.forward_counters(shard))
        return {
            "kind": "counters",
            "shard": shard,
            "logged": int(logged or 0),
            "applied": int(applied or 0),
            "records": int(records or 0),
            "verdicts": _texts(verdicts),
            "drain_seconds": _texts(drain),
            "apply_lag": _texts(lag),
            "forwarding": _texts(cast(dict[bytes, bytes], forwarding)),
        }


def _texts(found: dict[bytes, bytes]) -> dict[str, str]:
    return {text(name): text(value) for name, value in found.items()}


def export_store(store: Store, out: IO[str]) -> Counter[str]:
    """Write the store to `out`: a header (format, version, key prefix, shard count, how many
    lines of each kind follow), the lines, and an end line. Refused (TransferError) unless the
    store is drained; fails if it changed while it was read (the end line is then missing, so
    no import takes the file)."""
    problem = not_drained(store)
    if problem is not None:
        raise TransferError(f"the store is not drained: {problem}")
    before = _store_state(store)
    exporter = Exporter(store)
    expected = exporter.counts()
    header = {
        "format": FORMAT,
        "version": VERSION,
        "key_prefix": store.keys.prefix,
        "shards": store.keys.shards,
        "exported_ms": exporter.now_ms,
        "counts": dict(sorted(expected.items())),
    }
    out.write(json.dumps(header) + "\n")
    written: Counter[str] = Counter()
    for line in exporter.lines():
        out.write(json.dumps(line) + "\n")
        written[line["kind"]] += 1
    if _store_state(store) != before or written + exporter.vanished != expected:
        raise TransferError(
            "the store changed while it was exported (a web process or a worker still running?):"
            " stop every process of the service and export again"
        )
    out.write(json.dumps({"kind": "end", "vanished": dict(exporter.vanished)}) + "\n")
    return written


def target_problem(store: Store) -> str | None:
    """Why the store cannot be imported into, if it cannot: it holds keys of the deployment
    (its prefix) or its workers run."""
    keys = store.keys
    if store.redis.exists(keys.import_marker()):
        return (
            "an import into this Redis did not finish: empty it (it was empty before: "
            "FLUSHDB, or delete the keys under the prefix) and import again"
        )
    for redis in distinct(store.redis, store.queue_redis):
        for _ in redis.scan_iter(match=keys.everything(), count=READ_BATCH):
            return f"the target is not empty: it holds keys under `{keys.prefix}:`"
    if workers_running(store):
        return "stop the target's workers first (RQ lists some as running)"
    return None


def _following_free(last: StreamId | None, wanted: StreamId) -> StreamId:
    """The id an entry logged at `wanted` takes in a stream whose last id is `last`: its own,
    or, when that is taken by another shard's entry, the next one free (the same millisecond,
    as `wanted` is never earlier than `last`'s)."""
    if last is None or wanted > last:
        return wanted
    return last[0], last[1] + 1


def _preceding(entry_id: StreamId) -> StreamId:
    ms, seq = entry_id
    return (ms, seq - 1) if seq else (ms - 1, LAST_ID)


class Importer:
    """Writes an export's lines into the target store as they are read."""

    def __init__(self, store: Store, source: Keys, now_ms: int) -> None:
        self.store, self.keys, self.source, self.now_ms = store, store.keys, source, now_ms
        self.pipe = store.redis.pipeline(transaction=False)
        self.queue_pipe = store.queue_redis.pipeline(transaction=False)
        self.read: Counter[str] = Counter()
        # Per source shard, the log ids that changed as its entries joined another's in a log.
        self.moved: dict[int, dict[str, str]] = defaultdict(dict)
        self.last: dict[tuple[str, int], StreamId] = {}
        self.first_log: dict[int, StreamId] = {}
        self.previous: tuple[str, tuple[StreamId, int]] | None = None
        self.source_ids: list[StreamId] = []
        self.snapshot_taken = False
        # Per source shard, what a rebuild there took its log to cover: its snapshot position
        # and cursor, and the first entry its log held.
        self.source_shards: dict[int, tuple[str | None, str | None]] = {}
        self.source_first: dict[int, str] = {}

    def take(self, line: dict[str, Any]) -> None:
        kind = line["kind"]
        self.read[kind] += 1
        if kind in STREAMS:
            self._entry(kind, line)
        else:
            getattr(self, f"_{kind}")(line)
        if len(self.pipe) >= WRITE_BATCH:
            self.pipe.execute()
        if len(self.queue_pipe) >= WRITE_BATCH:
            self.queue_pipe.execute()

    def _shard(self, line: dict[str, Any]) -> None:
        self.source_shards[int(line["shard"])] = (line["position"], line["cursor"])
        for name in ("cursor", "last_id"):
            if line[name] is not None:
                self.source_ids.append(streamids.parse(line[name]))
        self.snapshot_taken |= line["position"] is not None

    def _entry(self, kind: str, line: dict[str, Any]) -> None:
        """A stream entry, into its call's shard's stream, under the id it had or the next free
        one; the file gives every stream's entries in id order, which keeps each call's."""
        shard, old_id = int(line["shard"]), line["id"]
        order = (streamids.parse(old_id), shard)
        if self.previous is not None and self.previous[0] == kind and order <= self.previous[1]:
            raise TransferError(f"the file's {kind} entries are out of order at {old_id}")
        self.previous = (kind, order)
        fields = {name: _unb64(value) for name, value in line["fields"].items()}
        call_id = fields.get("call_id", b"").decode("utf-8", "replace")
        target = self.keys.shard_of(call_id)
        new = _following_free(self.last.get((kind, target)), order[0])
        self.last[kind, target] = new
        new_id = streamids.text(new)
        if kind == "log":
            self.source_first.setdefault(shard, old_id)
            self.first_log.setdefault(target, new)
            if new_id != old_id:
                self.moved[shard][old_id] = new_id
        key = {"log": self.keys.log, "records": self.keys.records, "outbox": self.keys.outbox}
        self.pipe.xadd(key[kind](target), fields, id=new_id)  # type: ignore[arg-type]

    def _renumbered(self, call_id: str, packed: bytes) -> tuple[Doc | None, bytes]:
        """The document with the log ids its entries now have; its stored form unchanged when
        none moved (an unreadable value is carried as it is)."""
        doc = unpack_doc_or_empty(packed)
        if not isinstance(doc.get("journal"), list) or "status" not in doc:
            return None, packed
        moved = self.moved.get(self.source.shard_of(call_id), {})
        changed = False
        for item in doc["journal"]:
            if item["log_id"] in moved:
                item["log_id"], changed = moved[item["log_id"]], True
        overflow = cast(dict[str, Any], doc.get("overflow") or {})
        for name in ("first_log_id", "last_log_id"):
            if overflow.get(name) in moved:
                overflow[name], changed = moved[overflow[name]], True
        return doc, pack_doc(doc) if changed else packed

    def _snapshot(self, line: dict[str, Any]) -> None:
        call_id = line["call_id"]
        _, packed = self._renumbered(call_id, _unb64(line["doc"]))
        self.pipe.hset(self.keys.snapshot(self.keys.shard_of(call_id)), call_id, packed)

    def _call(self, line: dict[str, Any]) -> None:
        """A document, with its expiry; an active one indexed and counted as a commit does."""
        call_id, expires = line["call_id"], line["expires_at_ms"]
        if expires is not None and expires <= self.now_ms:
            return
        doc, packed = self._renumbered(call_id, _unb64(line["value"]))
        if doc is not None and self._trimmed_in_source(call_id, doc):
            # Its shard's log may now start before its first entries: only the mark a snapshot
            # step gives such a call keeps a rebuild from taking it for derivable and degrading
            # it. Not over a copy the source's snapshot held.
            self.pipe.hsetnx(
                self.keys.snapshot(self.keys.shard_of(call_id)), call_id, HISTORY_TRIMMED
            )
            self.snapshot_taken = True
        if doc is not None and is_active(doc):
            self.store.docs.write_doc(self.pipe, doc, packed, frozenset())
            shard = self.keys.shard_of(call_id)
            self.pipe.hincrby(self.keys.active_statuses(shard), cast(str, doc["status"]), 1)
        else:
            self.pipe.set(self.keys.call(call_id), packed, pxat=expires)

    def _trimmed_in_source(self, call_id: str, doc: Doc) -> bool:
        """Whether the source's rebuild left the call as `history_trimmed`: its first entries
        trimmed by a version before snapshots (renumbering never moves an id below its own)."""
        shard = self.source.shard_of(call_id)
        position, cursor = self.source_shards.get(shard, (None, None))
        # As a rebuild reads it: an empty log was trimmed up to its cursor.
        log_from = self.source_first.get(shard) or (streamids.following(cursor) if cursor else None)
        covered = Snapshot(position, {}, log_from)
        return covered.underivable(call_id, first_log_id(doc)) == "history_trimmed"

    def _tombstone(self, line: dict[str, Any]) -> None:
        expires = line["expires_at_ms"]
        if expires is None or expires > self.now_ms:
            key = self.keys.tombstone(line["call_id"])
            self.pipe.set(key, _unb64(line["value"]), pxat=expires)

    def _history(self, line: dict[str, Any]) -> None:
        """A call's latest record, with its index entries written as a commit writes them."""
        packed = _unb64(line["record"])
        record = json.loads(unpack(packed))
        known = {(record["call_id"], record["revision"]): packed}
        self.store.history.queue_records(self.pipe, [record], {}, known)

    def _dead_letter(self, line: dict[str, Any]) -> None:
        letter = line["letter"]
        shard = self.keys.shard_of(json.loads(letter)["call_id"])
        self.queue_pipe.lpush(self.keys.dead_letters(shard), letter)

    def _pending(self, line: dict[str, Any]) -> None:
        delivery = json.loads(line["delivery"])
        letter = {
            **delivery,
            "failed_ms": self.now_ms,
            "problem": PENDING_PROBLEM,
            "id": line["job"],
        }
        shard = self.keys.shard_of(delivery["call_id"])
        self.queue_pipe.lpush(self.keys.dead_letters(shard), json.dumps(letter))

    def _quarantine(self, line: dict[str, Any]) -> None:
        """A quarantined delivery; an unprocessable entry's place names the target's log."""
        raw = line["item"]
        item = json.loads(raw)
        if isinstance(item, dict) and isinstance(item.get("call_id"), str) and "log_id" in item:
            moved = self.moved.get(item.get("shard", -1), {})
            item["log_id"] = moved.get(item["log_id"], item["log_id"])
            item["shard"] = self.keys.shard_of(item["call_id"])
            raw = json.dumps(item)
        self.pipe.lpush(self.keys.quarantine(), raw)

    def _quarantined(self, line: dict[str, Any]) -> None:
        self.pipe.incrby(self.keys.quarantined_counter(), line["count"])

    def _counters(self, line: dict[str, Any]) -> None:
        """A source shard's counters, added to one target shard's: the totals stay, and each
        target shard's logged and applied counts still agree (nothing waits)."""
        keys, shard = self.keys, int(line["shard"]) % self.keys.shards
        self.pipe.incrby(keys.logged_counter(shard), line["logged"])
        self.pipe.incrby(keys.applied_counter(shard), line["applied"])
        self.pipe.incrby(keys.records_counter(shard), line["records"])
        for name, key in (
            ("verdicts", keys.verdicts(shard)),
            ("drain_seconds", keys.drain_seconds(shard)),
            ("apply_lag", keys.apply_lag(shard)),
        ):
            _add_to_hash(self.pipe, key, line[name])
        _add_to_hash(self.queue_pipe, keys.forward_counters(shard), line["forwarding"])

    def finish(self) -> None:
        """Every shard's cursor and log's last id at the latest id given (so the target's new
        events come after all that moved, and nothing counts as waiting), and, where the source
        had snapshots, each shard's position just before its first entry: the copies plus the
        whole log re-derive every call."""
        given = self.source_ids + [last for (kind, _), last in self.last.items() if kind == "log"]
        latest = max(given, default=None)
        for shard in range(self.keys.shards):
            if latest is not None:
                self._end_log_at(shard, latest)
            if self.snapshot_taken:
                first = self.first_log.get(shard)
                position = _preceding(first) if first is not None else latest
                if position is not None:
                    self.pipe.set(self.keys.snapshot_position(shard), streamids.text(position))
        self.pipe.execute()
        self.queue_pipe.execute()

    def _end_log_at(self, shard: int, latest: StreamId) -> None:
        log, at = self.keys.log(shard), streamids.text(latest)
        if self.last.get(("log", shard)) != latest:
            # A stream keeps its last id when its entries are deleted: new entries follow it.
            self.pipe.xadd(log, {"call_id": ""}, id=at)
            self.pipe.xdel(log, at)
        self.pipe.set(self.keys.cursor(shard), at)


def import_store(store: Store, lines: Iterable[str]) -> Counter[str]:
    """Read an export into the target store, which must be empty; return how many lines of each
    kind were read. While it writes, a marker makes the service and a second import refuse the
    store; a file that is not a whole export leaves it (TransferError)."""
    problem = target_problem(store)
    if problem is not None:
        raise TransferError(problem)
    read = iter(lines)
    header = _header(next(read, ""))
    store.redis.set(store.keys.import_marker(), json.dumps(header["counts"]))
    source = Keys(header["key_prefix"], header["shards"])
    importer = Importer(store, source, store.log.server_time_ms())
    end: dict[str, Any] | None = None
    for raw in read:
        line = json.loads(raw)
        if end is not None:
            raise TransferError("the file goes on after its end line")
        if line["kind"] == "end":
            end = line
        else:
            importer.take(line)
    if end is None:
        raise TransferError("the file ends before its end line: the export did not finish")
    expected = Counter(cast(dict[str, int], header["counts"]))
    if +(importer.read + Counter(cast(dict[str, int], end["vanished"]))) != +expected:
        raise TransferError(
            f"the file holds other lines than its header counts: {dict(importer.read)}"
        )
    importer.finish()
    store.redis.delete(store.keys.import_marker())
    return importer.read


def _header(raw: str) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TransferError("not a callstate store export (no header line)")
    if header.get("version") != VERSION:
        raise TransferError(
            f"an export of version {header.get('version')}: this release reads version {VERSION}"
        )
    return header


def _add_to_hash(pipe: Pipeline, key: str, values: dict[str, str]) -> None:
    for name, value in values.items():
        if value.lstrip("-").isdigit():
            pipe.hincrby(key, name, int(value))
        else:
            pipe.hincrbyfloat(key, name, float(value))
