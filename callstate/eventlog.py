"""The event log: one Redis stream per shard, the source of truth, and each shard's cursor."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

from redis import Redis
from redis.exceptions import NoScriptError, RedisError
from redis.typing import EncodableT, FieldT

from callstate import streamids
from callstate.calls import PROCESS_ERRORS, LogEntry, error_name
from callstate.codec import pack, unpack
from callstate.config import Settings
from callstate.connection import StreamRows, forget_routes, server_of, text
from callstate.coordination import new_wake_id
from callstate.keys import Keys
from callstate.schema import CALL_ID_PATTERN, PayloadError, decode_logged

# Log an event, count it, and claim its shard's wake flag for the drain job the caller will
# queue, as one command with one reply: the webhook's only Redis call. A flag whose job was never
# queued (a web process that died in between) is found out and replaced by maintenance.
APPEND_EVENT = """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('INCR', KEYS[3])
local claimed = redis.call('SET', KEYS[2], ARGV[1], 'NX')
return {id, claimed and 1 or 0}
"""


class NotReplicatedError(Exception):
    """An event is logged on the primary, but fewer replicas than required confirmed it in time:
    a failover now could lose it, so it is not acknowledged (the sender delivers it again)."""

    def __init__(self, log_id: str, shard: int, wake_id: str | None, replicas: int) -> None:
        super().__init__(f"{log_id} reached {replicas} replicas")
        self.log_id, self.shard, self.wake_id, self.replicas = log_id, shard, wake_id, replicas


class EventLog:
    """Appends to and reads from the shards' event logs."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.shards)
        self._append_event = redis.register_script(APPEND_EVENT)

    def append_event(
        self, call_id: str, raw: bytes, signer: int | None = None
    ) -> tuple[str, int, str | None]:
        """Log a raw event (with the project whose own secret signed it, if one did); return
        its log id, its shard, and the wake id it claimed the flag for, if it did: the caller
        then queues the drain job of that id. With `replica_acks`, raise NotReplicatedError unless
        that many replicas confirm the event within the timeout (Redis WAIT)."""
        return self._append(call_id, event_fields(call_id, raw, signer), self.settings.replica_acks)

    def append_sweep(self, call_id: str, stale_before_ms: int) -> tuple[str, int, str | None]:
        """Log a request to close a call that has been silent since before `stale_before_ms`;
        return as `append_event` does."""
        return self._append(call_id, {"call_id": call_id, "sweep_before_ms": stale_before_ms})

    def _append(
        self, call_id: str, fields: dict[FieldT, EncodableT], replicas: int = 0
    ) -> tuple[str, int, str | None]:
        shard, wake_id = self.keys.shard_of(call_id), new_wake_id()
        keys = [self.keys.log(shard), self.keys.wake(shard), self.keys.logged_counter(shard)]
        args: list[EncodableT] = [wake_id, *(x for pair in fields.items() for x in pair)]
        if replicas:
            (log_id, claimed), acks = self._append_and_wait(keys, args, replicas)
        else:
            (log_id, claimed), acks = self._append_event(keys=keys, args=args), 0
        claimed_id = wake_id if claimed else None
        if acks < replicas:
            raise NotReplicatedError(text(log_id), shard, claimed_id, acks)
        return text(log_id), shard, claimed_id

    def _append_and_wait(
        self, keys: list[str], args: list[EncodableT], replicas: int
    ) -> tuple[Any, int]:
        """The append script's reply and how many replicas confirmed it: both commands in one
        round trip on one connection, as WAIT counts the writes of the connection it is sent on."""
        server = server_of(self.redis, keys[0])
        try:
            with server.pipeline(transaction=False) as pipe:
                for _ in range(2):
                    pipe.evalsha(self._append_event.sha, len(keys), *keys, *args)
                    pipe.wait(replicas, self.settings.replica_ack_timeout_ms)
                    try:
                        reply, acks = pipe.execute()
                        return reply, int(acks)
                    except NoScriptError:
                        # A restarted or failed-over server has lost its scripts: nothing ran.
                        self._append_event.sha = server.script_load(APPEND_EVENT)
        except RedisError:
            forget_routes(self.redis)
            raise
        raise NoScriptError("the append script could not be loaded")

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
        return text(raw) if raw else None

    def last_log_id(self, shard: int) -> str | None:
        rows = cast(StreamRows, self.redis.xrevrange(self.keys.log(shard), "+", "-", count=1))
        return text(rows[0][0]) if rows else None

    def first_log_id(self, shard: int) -> str | None:
        rows = cast(StreamRows, self.redis.xrange(self.keys.log(shard), "-", "+", count=1))
        return text(rows[0][0]) if rows else None

    def has_backlog(self, shard: int) -> bool:
        last = self.last_log_id(shard)
        if last is None:
            return False
        cursor = self.cursor(shard)
        return cursor is None or streamids.parse(last) > streamids.parse(cursor)

    def server_time_ms(self) -> int:
        seconds, micros = self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000


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
