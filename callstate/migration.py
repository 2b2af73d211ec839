"""`callstate migrate-keys`: a store written before the keys carried their shard's hash tag
(`cs:log:3`, one global `cs:active` and `cs:records`) moved to today's layout (`cs:{s3}:log`,
each shard's own active calls and records), with the service stopped.

Every key keeps its contents and its TTL: renamed where it belonged to one shard or one call,
split by each member's shard where it was global. Nothing is re-derived; `rebuild --check`
afterwards compares every call with its log.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from redis import Redis
from redis.exceptions import RedisError

from callstate import streamids
from callstate.connection import StreamRows, text
from callstate.keys import Keys

# The old layout's one-shard keys, `<prefix>:<name>:<shard>`, and the method that names them now.
PER_SHARD: dict[str, Callable[[Keys, int], str]] = {
    "log": Keys.log,
    "cursor": Keys.cursor,
    "drain-lock": Keys.drain_lock,
    "drain-lock-wanted": Keys.drain_lock_wanted,
    "wake": Keys.wake,
    "history": Keys.history,
    "history-end": Keys.history_by_end,
    "stats:logged": Keys.logged_counter,
    "stats:applied": Keys.applied_counter,
    "stats:verdicts": Keys.verdicts,
    "stats:records": Keys.records_counter,
    "stats:active": Keys.active_statuses,
    "stats:drain-seconds": Keys.drain_seconds,
    "stats:apply-lag": Keys.apply_lag,
    "snapshot": Keys.snapshot,
    "snapshot-position": Keys.snapshot_position,
    "board-rejections": Keys.board_rejections,
    "outbox": Keys.outbox,
    "forward-wake": Keys.forward_wake,
    "forward-lock": Keys.forward_lock,
    "forward-chains": Keys.forward_chains,
    "forward-pending": Keys.forward_pending,
    "dead-letters": Keys.dead_letters,
    "stats:forwarding": Keys.forward_counters,
}
# One-call keys, `<prefix>:<name>:<call id>`.
PER_CALL: dict[str, Callable[[Keys, str], str]] = {
    "call": Keys.call,
    "tombstone": Keys.tombstone,
}
# The families the refusal looks for (`old_layout_present`): a run moves them last, so a run
# killed at any point leaves one of them, and the store refused, until a run finishes.
WITNESSES = ("log", "cursor", "active", "records")
SPLIT_BATCH = 1000
# The data side of a move of deliveries, once per move: the moved letters (the oldest, at the
# list's tail: the old set-up pushes new ones at its head) and counts taken away, what came
# after them kept. KEYS: letters, counts, the data side's marker; ARGV: the move's id, how many
# letters, then each count's name and amount.
TAKE_MOVED = """
if redis.call('GET', KEYS[3]) == ARGV[1] then
    return 0
end
local letters = tonumber(ARGV[2])
if letters > 0 then
    redis.call('LTRIM', KEYS[1], 0, -letters - 1)
end
for i = 3, #ARGV, 2 do
    if redis.call('HINCRBY', KEYS[2], ARGV[i], -tonumber(ARGV[i + 1])) == 0 then
        redis.call('HDEL', KEYS[2], ARGV[i])
    end
end
redis.call('SET', KEYS[3], ARGV[1])
return 1
"""
OLD_LAYOUT_MESSAGE = (
    "this Redis holds a store written before the keys carried their shard's hash tag: stop the "
    "web and the workers, run `callstate migrate-keys`, then start them again"
)
IMPORT_MESSAGE = (
    "`callstate import-store` is writing this store, or stopped before it finished: wait for "
    "it; if it stopped, empty this Redis and import again"
)
DELIVERIES_MESSAGE = (
    "the data Redis still holds the record deliveries of before CALLSTATE_QUEUE_URL (or "
    "CALLSTATE_QUEUE_SENTINEL_MASTER) was set: run `callstate migrate-keys`, which moves the "
    "dead letters and counts to the queue's Redis once no delivery waits in a job there (until "
    "then, run without the setting until `callstate stats` shows 0 retrying)"
)


@dataclass
class Migration:
    """What a run moved (or, checking, would move): keys renamed and split, by family."""

    renamed: Counter[str] = field(default_factory=Counter)
    split: Counter[str] = field(default_factory=Counter)
    conflicts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OldKey:
    """A key of the old layout: its family, and its new name, or for a global key the name of
    each shard's part (a member goes to its call's shard)."""

    key: str
    family: str
    new: str | None = None
    part: Callable[[int], str] | None = None


def old_keys(redis: Redis, keys: Keys) -> Iterator[OldKey]:
    """Every key of the old layout under the deployment's prefix."""
    for raw in redis.scan_iter(match=f"{keys.prefix}:*", count=1000):
        found = classify(keys, text(raw))
        if found is not None:
            yield found


def classify(keys: Keys, key: str) -> OldKey | None:
    """The old-layout family of `key` and where it goes; None for a key of today's layout or one
    that did not change (the quarantine and its counter)."""
    rest = key[len(keys.prefix) + 1 :]
    if rest.startswith("{"):
        return None
    if rest == "active":
        return OldKey(key, rest, part=keys.active)
    if rest == "records":
        return OldKey(key, rest, part=keys.records)
    for kind in ("number", "user"):
        if rest.startswith(f"active:{kind}:"):
            value = rest[len(f"active:{kind}:") :]
            return OldKey(key, f"active:{kind}", part=partial(_active_by, keys, kind, value))
        found = re.fullmatch(rf"history-{kind}:(\d+):(.*)", rest, re.DOTALL)
        if found:
            shard, value = int(found[1]), found[2]
            return OldKey(key, f"history-{kind}", keys.history_by(shard, kind, value))
    for name, new_key in PER_CALL.items():
        if rest.startswith(f"{name}:"):
            return OldKey(key, name, new_key(keys, rest[len(name) + 1 :]))
    name, _, number = rest.rpartition(":")
    if name in PER_SHARD and number.isdigit():
        return OldKey(key, name, PER_SHARD[name](keys, int(number)))
    return None


def _active_by(keys: Keys, kind: str, value: str, shard: int) -> str:
    return keys.active_by(shard, kind, value)


def old_layout_present(redis: Redis, keys: Keys) -> bool:
    """Whether the store still holds the old layout's logs, cursors or global keys: one EXISTS.
    The service refuses to start on it, as it would not see the calls stored there."""
    names = [
        f"{keys.prefix}:{name}:{shard}" for name in WITNESSES[:2] for shard in range(keys.shards)
    ]
    return bool(redis.exists(*names, *(f"{keys.prefix}:{name}" for name in WITNESSES[2:])))


class NotMigratedError(RuntimeError):
    """The store needs `callstate migrate-keys` first. An exception, not an exit: gunicorn
    stops on a worker that fails to boot, and starts another after one that exits."""


def unmigrated(redis: Redis, queue_redis: Redis, keys: Keys) -> str | None:
    """Why the service cannot run on this store yet: the layout before hash tags, an import
    under way or stopped halfway, or delivery state left on the data Redis by a deployment that
    has since moved its queues; None when it can. Three round trips at most."""
    if old_layout_present(redis, keys):
        return OLD_LAYOUT_MESSAGE
    if redis.exists(keys.import_marker()):
        return IMPORT_MESSAGE
    if queue_redis is not redis and redis.exists(*_delivery_keys(keys)):
        return DELIVERIES_MESSAGE
    return None


def refuse_unmigrated(redis: Redis, queue_redis: Redis, keys: Keys) -> bool:
    """What the web and the workers do at start: stop, saying why, rather than serve a store
    whose calls or deliveries they cannot see. A Redis that does not answer yet is not refused:
    the web starts and checks at each request until the check is made (`web.checked_first`), the
    workers wait for it and check then. Whether the check was made."""
    try:
        why = unmigrated(redis, queue_redis, keys)
    except RedisError:
        return False
    if why is not None:
        raise NotMigratedError(why)
    return True


def _delivery_keys(keys: Keys) -> list[str]:
    return [
        name(shard)
        for shard in range(keys.shards)
        for name in (
            keys.forward_pending,
            keys.forward_chains,
            keys.dead_letters,
            keys.forward_counters,
        )
    ]


def move_deliveries(redis: Redis, queue_redis: Redis, keys: Keys) -> int | None:
    """The dead letters and delivery counts a deployment kept on the data Redis, moved to the
    queue's Redis it uses now (letters after those there, counts added); how many lists and
    hashes were moved, or None, moving nothing, while a delivery still waits in a job on the
    data Redis (its call's next revisions must wait for it, and only the old set-up runs it).
    A run killed halfway is finished by the next, which moves nothing twice and keeps what the
    old set-up added meanwhile (unless it redelivered a moved letter: run it again first)."""
    if queue_redis is redis:
        return 0
    shards = range(keys.shards)
    waiting = [keys.forward_pending(s) for s in shards] + [keys.forward_chains(s) for s in shards]
    if redis.exists(*waiting):
        return None
    take_moved = redis.register_script(TAKE_MOVED)
    moved = 0
    for shard in shards:
        while (move := _started_move(redis, queue_redis, keys, shard)) is not None:
            letters_key, counts_key = keys.dead_letters(shard), keys.forward_counters(shard)
            marker = keys.deliveries_moved(shard)
            counts = [x for name, count in move["counts"].items() for x in (name, count)]
            take_moved(
                keys=[letters_key, counts_key, marker], args=[move["id"], move["letters"], *counts]
            )
            queue_redis.delete(marker)
            redis.delete(marker)
            moved += bool(move["letters"]) + bool(move["counts"])
    return moved


def _started_move(redis: Redis, queue_redis: Redis, keys: Keys, shard: int) -> Any:
    """The shard's move to finish: one a killed run left (its marker on the queue's Redis), or a
    new one of what the data Redis holds now, copied in one transaction with its marker; None
    when nothing is left to move."""
    marker = keys.deliveries_moved(shard)
    left = queue_redis.get(marker)
    if left is not None:
        return json.loads(left)
    letters = cast(list[bytes], redis.lrange(keys.dead_letters(shard), 0, -1))
    counts = cast(dict[bytes, bytes], redis.hgetall(keys.forward_counters(shard)))
    if not letters and not counts:
        return None
    amounts = {text(name): int(count) for name, count in counts.items()}
    move = {"id": uuid.uuid4().hex, "letters": len(letters), "counts": amounts}
    pipe = queue_redis.pipeline()
    if letters:  # newest first, and older than any letter there: after them
        pipe.rpush(keys.dead_letters(shard), *letters)
    for name, count in amounts.items():
        pipe.hincrby(keys.forward_counters(shard), name, count)
    pipe.set(marker, json.dumps(move))
    pipe.execute()
    return move


def migrate(redis: Redis, keys: Keys, *, check_only: bool = False) -> Migration:
    """Move every old-layout key of `redis` to its new name or names; with `check_only`, only
    count them. A renamed key whose new name exists already is left, as a conflict."""
    done = Migration()
    for old in sorted(old_keys(redis, keys), key=lambda found: found.family in WITNESSES):
        if old.part is not None:
            done.split[old.family] += 1
            if not check_only:
                SPLITTERS[cast(bytes, redis.type(old.key))](redis, keys, old.key, old.part)
        elif check_only or redis.renamenx(old.key, cast(str, old.new)):
            done.renamed[old.family] += 1
        else:
            done.conflicts.append(old.key)
    return done


def _split_sorted_set(redis: Redis, keys: Keys, key: str, part: Callable[[int], str]) -> None:
    """An active-calls sorted set into each member's shard's own, scores kept."""
    start = 0
    while rows := cast(
        list[tuple[bytes, float]],
        redis.zrange(key, start, start + SPLIT_BATCH - 1, withscores=True),
    ):
        pipe = redis.pipeline(transaction=False)
        for member, score in rows:
            pipe.zadd(part(keys.shard_of(text(member))), {member: score})
        pipe.execute()
        start += SPLIT_BATCH
    redis.delete(key)


def _split_stream(redis: Redis, keys: Keys, key: str, part: Callable[[int], str]) -> None:
    """The records stream into each record's shard's stream, entry ids kept, in order. A run
    killed halfway copied the first entries of each shard: those are skipped, as XADD refuses
    an id not above the stream's last."""
    copied = {shard: _last_id(redis, part(shard)) for shard in range(keys.shards)}
    after = "-"
    while rows := cast(StreamRows, redis.xrange(key, after, count=SPLIT_BATCH)):
        pipe = redis.pipeline(transaction=False)
        for entry_id, fields in rows:
            shard = keys.shard_of(text(fields[b"call_id"]))
            if streamids.parse(text(entry_id)) > copied[shard]:
                pipe.xadd(part(shard), fields, id=entry_id)  # type: ignore[arg-type]
        pipe.execute()
        after = f"({text(rows[-1][0])}"
    redis.delete(key)


def _last_id(redis: Redis, key: str) -> streamids.StreamId:
    last = cast(StreamRows, redis.xrevrange(key, count=1))
    return streamids.parse(text(last[0][0])) if last else (0, 0)


SPLITTERS: dict[bytes, Callable[[Redis, Keys, str, Callable[[int], str]], None]] = {
    b"zset": _split_sorted_set,
    b"stream": _split_stream,
}
