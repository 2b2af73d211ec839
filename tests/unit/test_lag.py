"""The apply-lag histogram: every applied event counted once, in its bucket, on Redis' clock."""

from __future__ import annotations

import math
import time
from typing import cast

from redis import Redis

from callstate import lag
from callstate.drain import Drainer
from callstate.store import Store
from tests.factories import body, event

# Lags chosen one per region of the histogram: exact ms, 10 ms, 100 ms, 1 s steps, and beyond.
LAGS_MS = (7, 150, 2_345, 45_678, 3_600_000)


def expected_bucket(lag_ms: int) -> float:
    """The documented rule, written again here as the test's oracle."""
    if lag_ms <= 100:
        return lag_ms
    if lag_ms <= 1000:
        return math.ceil(lag_ms / 10) * 10
    if lag_ms <= 10_000:
        return math.ceil(lag_ms / 100) * 100
    if lag_ms <= 60_000:
        return math.ceil(lag_ms / 1000) * 1000
    return math.inf


def server_ms(redis: Redis) -> int:
    seconds, micros = redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_each_lag_is_counted_in_its_bucket_with_count_and_sum(redis: Redis) -> None:
    started = time.monotonic()
    now = server_ms(redis)
    script = lag.COUNT_APPLY_LAG + "count_apply_lag(KEYS[1], ARGV, 1, #ARGV)"
    redis.eval(script, 1, "h", *(now - ms for ms in LAGS_MS))
    late_by = math.ceil((time.monotonic() - started) * 1000)
    stored = cast(dict[bytes, bytes], redis.hgetall("h"))
    counts = lag.lag_counts(stored)
    assert sum(counts.values()) == len(LAGS_MS) == int(stored[b"count"])
    for ms in LAGS_MS:
        possible = {expected_bucket(ms + extra) for extra in range(late_by + 1)}
        assert any(counts.get(bucket) for bucket in possible), (ms, counts)
    assert sum(LAGS_MS) <= int(stored[b"sum_ms"]) <= sum(LAGS_MS) + late_by * len(LAGS_MS)


def test_a_drained_batch_counts_every_entry_once(store: Store, drainer: Drainer) -> None:
    call_ids = [f"lag-{n}" for n in range(12)]
    for call_id in call_ids:
        store.log.append_event(call_id, body(event(call_id, "ringing", 1)))
        store.log.append_event(call_id, body(event(call_id, "ringing", 1)))  # a duplicate
    for shard in range(store.settings.shards):
        drainer.drain(shard)
    per_shard = [
        lag.lag_counts(cast(dict[bytes, bytes], store.redis.hgetall(store.keys.apply_lag(s))))
        for s in range(store.settings.shards)
    ]
    assert sum(sum(counts.values()) for counts in per_shard) == 24 == store.docs.applied_count()
    for shard, counts in enumerate(per_shard):
        logged = int(store.redis.xlen(store.keys.log(shard)))
        assert sum(counts.values()) == logged, "each shard counts its own entries"


def test_percentiles_are_the_upper_bound_of_the_bucket_holding_them() -> None:
    counts = {1.0: 50, 4.0: 45, 30.0: 4, math.inf: 1}
    assert lag.percentile_ms(counts, 0.5) == 1.0
    assert lag.percentile_ms(counts, 0.51) == 4.0
    assert lag.percentile_ms(counts, 0.99) == 30.0
    assert lag.percentile_ms(counts, 1.0) == math.inf
    assert lag.percentile_ms({}, 0.5) is None
