"""The pipeline's figures, kept in Redis per shard and read at once for `/metrics`, `/readyz`,
the board and `callstate stats`: every reader sees the same truth, and workers need no port."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass
from typing import TypeVar, cast

from redis import Redis

from callstate import streamids
from callstate.connection import StreamRows, get_many, text
from callstate.keys import Keys
from callstate.lag import lag_counts
from callstate.store import Store

# Set a shard's count of logged entries to what its log and its applied count say, atomically
# with respect to the appends (a script runs alone): for a store whose log was written before the
# counters existed. Reads the backlog whole, which is small where this is run: in a rebuild.
COUNT_LOGGED_ANEW = """
local cursor = redis.call('GET', KEYS[2])
local waiting = #redis.call('XRANGE', KEYS[1], cursor and ('(' .. cursor) or '-', '+')
local applied = tonumber(redis.call('GET', KEYS[3]) or '0')
redis.call('SET', KEYS[4], applied + waiting)
return waiting
"""
# Replies per shard in read_figures: the logged, applied and records counters and the cursor,
# one GET each (a cluster's pipeline refuses MGET), then verdicts, active, drain seconds, apply
# lag, the outbox; and from the queue's Redis, the delivery jobs' figures.
COUNTERS = 4
PER_SHARD = COUNTERS + 5
DELIVERY_READS = 3
DRAIN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Apply lag's buckets fall on the bounds of the stored histogram's (callstate/lag.py), so each
# count is exact; 5 ms and 25 ms are the targets at half load.
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5, 10, 30, 60)

K = TypeVar("K")


@dataclass(frozen=True)
class Histogram:
    """Cumulative counts per upper bound (the last one +Inf), with the sum and count."""

    buckets: list[tuple[float, int]]
    sum: float
    count: int


@dataclass(frozen=True)
class Backlog:
    """Entries of a shard logged and not yet applied, and the age of the oldest of them."""

    shard: int
    entries: int
    oldest_seconds: float | None


@dataclass(frozen=True)
class Forwarding:
    """A shard's record forwarding: deliveries made, attempts failed, deliveries given up (and
    still kept as dead letters), revisions waiting in the outbox, deliveries being retried."""

    delivered: int = 0
    failed: int = 0
    dead_lettered: int = 0
    dead_letters: int = 0
    outbox: int = 0
    retrying: int = 0

    def __add__(self, other: Forwarding) -> Forwarding:
        return Forwarding(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass(frozen=True)
class ShardFigures:
    shard: int
    logged: int
    applied: int
    backlog: Backlog
    verdicts: dict[str, int]
    records: int
    active: dict[str, int]
    drain_seconds: Histogram
    apply_lag: Histogram
    forwarding: Forwarding = Forwarding()


@dataclass(frozen=True)
class Figures:
    """Every shard's figures and the quarantine's, as of `server_ms` on Redis' clock."""

    server_ms: int
    shards: list[ShardFigures]
    quarantined: int
    quarantine_size: int

    @property
    def logged(self) -> int:
        return sum(shard.logged for shard in self.shards)

    @property
    def applied(self) -> int:
        return sum(shard.applied for shard in self.shards)

    @property
    def records(self) -> int:
        return sum(shard.records for shard in self.shards)

    @property
    def verdicts(self) -> dict[str, int]:
        return added_up(shard.verdicts for shard in self.shards)

    @property
    def active(self) -> dict[str, int]:
        return added_up(shard.active for shard in self.shards)

    @property
    def active_total(self) -> int:
        return sum(self.active.values())

    @property
    def forwarding(self) -> Forwarding:
        return sum((shard.forwarding for shard in self.shards), Forwarding())


def record_drain_seconds(redis: Redis, keys: Keys, shard: int, seconds: float) -> None:
    """Count one drain job's duration in the shard's histogram."""
    bucket = bisect.bisect_left(DRAIN_BUCKETS, seconds)
    bound = f"{DRAIN_BUCKETS[bucket]}" if bucket < len(DRAIN_BUCKETS) else "+Inf"
    pipe = redis.pipeline(transaction=False)
    pipe.hincrby(keys.drain_seconds(shard), bound, 1)
    pipe.hincrby(keys.drain_seconds(shard), "count", 1)
    pipe.hincrbyfloat(keys.drain_seconds(shard), "sum", seconds)
    pipe.execute()


def count_logged_anew(store: Store, shard: int) -> int:
    """Make the shard's logged count agree with its log (applied + waiting); return how many
    entries wait. Run under the shard's drain lock, so the applied count does not move."""
    keys = store.keys
    waiting = store.redis.eval(
        COUNT_LOGGED_ANEW,
        4,
        keys.log(shard),
        keys.cursor(shard),
        keys.applied_counter(shard),
        keys.logged_counter(shard),
    )
    return int(cast(int, waiting))


def entries_behind(redis: Redis, keys: Keys) -> int:
    """Entries logged and not yet applied over every shard, from the counters alone: one
    `MGET` (one per slot on a cluster), for whoever only needs to know whether the drainers
    are behind."""
    shards = range(keys.shards)
    names = [keys.logged_counter(shard) for shard in shards]
    names += [keys.applied_counter(shard) for shard in shards]
    counts = [_int(raw) for raw in get_many(redis, names)]
    return sum(counts[: keys.shards]) - sum(counts[keys.shards :])


def shard_backlogs(store: Store) -> list[Backlog]:
    """Each shard's backlog, for `/readyz`: three round trips whatever the number of shards
    (the server's clock, the counters, the logs)."""
    shards = range(store.settings.shards)
    # Apart: a cluster's client pipelines only commands it routes by key.
    now_ms = store.log.server_time_ms()
    pipe = store.redis.pipeline(transaction=False)
    for shard in shards:
        pipe.get(store.keys.logged_counter(shard))
        pipe.get(store.keys.applied_counter(shard))
        pipe.get(store.keys.cursor(shard))
    rows = pipe.execute()
    return _backlogs(store, now_ms, [rows[n : n + 3] for n in range(0, len(rows), 3)])


def read_figures(store: Store, with_deliveries: bool = True) -> Figures:
    """Every figure of every shard: five round trips whatever the number of shards, one of them
    to the queue's Redis for the delivery jobs' figures (without `with_deliveries`, those stay
    zero and only the data Redis is read)."""
    keys, shards = store.keys, range(store.settings.shards)
    deliveries = read_deliveries(store) if with_deliveries else [Forwarding() for _ in shards]
    now_ms = store.log.server_time_ms()
    pipe = store.redis.pipeline(transaction=False)
    pipe.get(keys.quarantined_counter())
    pipe.llen(keys.quarantine())
    for shard in shards:
        pipe.get(keys.logged_counter(shard))
        pipe.get(keys.applied_counter(shard))
        pipe.get(keys.cursor(shard))
        pipe.get(keys.records_counter(shard))
        pipe.hgetall(keys.verdicts(shard))
        pipe.hgetall(keys.active_statuses(shard))
        pipe.hgetall(keys.drain_seconds(shard))
        pipe.hgetall(keys.apply_lag(shard))
        pipe.xlen(keys.outbox(shard))
    quarantined, quarantine_size, *rows = pipe.execute()
    counters = [rows[PER_SHARD * shard : PER_SHARD * shard + COUNTERS] for shard in shards]
    backlogs = _backlogs(store, now_ms, counters)
    return Figures(
        server_ms=now_ms,
        shards=[
            ShardFigures(
                shard=shard,
                logged=_int(counters[shard][0]),
                applied=_int(counters[shard][1]),
                backlog=backlogs[shard],
                verdicts=_counts(rows[PER_SHARD * shard + COUNTERS + 0]),
                records=_int(counters[shard][3]),
                active={
                    status: n
                    for status, n in _counts(rows[PER_SHARD * shard + COUNTERS + 1]).items()
                    if n
                },
                drain_seconds=_histogram(rows[PER_SHARD * shard + COUNTERS + 2]),
                apply_lag=_lag_histogram(rows[PER_SHARD * shard + COUNTERS + 3]),
                forwarding=deliveries[shard]
                + Forwarding(outbox=int(rows[PER_SHARD * shard + COUNTERS + 4])),
            )
            for shard in shards
        ],
        quarantined=_int(quarantined),
        quarantine_size=int(quarantine_size),
    )


def read_forwarding(store: Store) -> Forwarding | None:
    """Forwarding's figures over every shard in two round trips, for the board; None while off."""
    if not store.settings.forwarding:
        return None
    deliveries = read_deliveries(store)
    pipe = store.redis.pipeline(transaction=False)
    for shard in range(store.settings.shards):
        pipe.xlen(store.keys.outbox(shard))
    outboxes = sum(int(n) for n in pipe.execute())
    return sum(deliveries, Forwarding(outbox=outboxes))


def read_deliveries(store: Store) -> list[Forwarding]:
    """Each shard's delivery-job figures, which live with RQ's jobs on the queue's Redis: one
    round trip (the outbox, on the data Redis, is not among them)."""
    keys = store.keys
    pipe = store.queue_redis.pipeline(transaction=False)
    for shard in range(store.settings.shards):
        pipe.hgetall(keys.forward_counters(shard))
        pipe.llen(keys.dead_letters(shard))
        pipe.hlen(keys.forward_pending(shard))
    replies = pipe.execute()
    return [
        _deliveries(*replies[n : n + DELIVERY_READS])
        for n in range(0, len(replies), DELIVERY_READS)
    ]


def _deliveries(counts: dict[bytes, bytes], dead_letters: int, retrying: int) -> Forwarding:
    found = _counts(counts)
    return Forwarding(
        delivered=found.get("delivered", 0),
        failed=found.get("failed", 0),
        dead_lettered=found.get("dead_lettered", 0),
        dead_letters=int(dead_letters),
        retrying=int(retrying),
    )


def _backlogs(store: Store, now_ms: int, counters: list[list[bytes | None]]) -> list[Backlog]:
    """Entries from the counters (exact, both written with what they count); the oldest
    unapplied entry's age from the log itself, the first entry after the cursor."""
    pipe = store.redis.pipeline(transaction=False)
    for shard, row in enumerate(counters):
        cursor = row[2]
        pipe.xrange(store.keys.log(shard), f"({text(cursor)}" if cursor else "-", "+", count=1)
    backlogs = []
    for shard, (row, found) in enumerate(zip(counters, pipe.execute(), strict=True)):
        oldest = cast(StreamRows, found)
        age = (now_ms - streamids.millis(text(oldest[0][0]))) / 1000 if oldest else None
        # At least the entry seen waiting, should the counters lag the log (see count_logged_anew).
        entries = max(1, _int(row[0]) - _int(row[1])) if oldest else 0
        backlogs.append(Backlog(shard, entries, None if age is None else max(0.0, age)))
    return backlogs


def added_up(counts: Iterable[Mapping[K, int]]) -> dict[K, int]:
    """Counts summed over shards (or readings); unlike `Counter`'s `+`, a count at or below zero
    is kept, so a drifted counter shows instead of vanishing."""
    total: dict[K, int] = {}
    for shard_counts in counts:
        for name, count in shard_counts.items():
            total[name] = total.get(name, 0) + count
    return total


def _histogram(raw: dict[bytes, bytes]) -> Histogram:
    fields = {text(name): value for name, value in raw.items()}
    running, buckets = 0, []
    for bound in (*DRAIN_BUCKETS, float("inf")):
        running += _int(fields.get("+Inf" if bound == float("inf") else f"{bound}"))
        buckets.append((bound, running))
    return Histogram(buckets, float(fields.get("sum", b"0")), _int(fields.get("count")))


def _lag_histogram(raw: dict[bytes, bytes]) -> Histogram:
    """The stored apply lags (ms buckets) in LAG_BUCKETS, in seconds."""
    counts = lag_counts(raw)
    buckets = [
        (bound, sum(n for ms, n in counts.items() if ms <= bound * 1000))
        for bound in (*LAG_BUCKETS, math.inf)
    ]
    return Histogram(buckets, _int(raw.get(b"sum_ms")) / 1000, _int(raw.get(b"count")))


def _counts(raw: dict[bytes, bytes]) -> dict[str, int]:
    return {text(name): int(value) for name, value in raw.items()}


def _int(raw: bytes | None) -> int:
    return int(raw) if raw else 0
