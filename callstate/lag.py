"""Apply lag: how long each event waited between its append and the commit that applied it, both
on Redis' clock, counted in a per-shard histogram by the commit itself, for every event."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from callstate import streamids
from callstate.connection import text

# A function of the commit's script (callstate/documents.py), so Redis' clock is read as the
# batch is applied: each entry's lag is that time less its id's (the append's) time. The
# entries' milliseconds are `args[first..last]`. The field is the lag's bucket, its upper bound
# in ms: exact to the ms up to 100 ms, where the targets are, coarser above, and few; plus count
# and sum.
COUNT_APPLY_LAG = """
local function count_apply_lag(key, args, first, last)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local buckets, total = {}, 0
  for i = first, last do
    local lag = math.max(0, now - tonumber(args[i]))
    local bucket = 'inf'
    if lag <= 100 then bucket = lag
    elseif lag <= 1000 then bucket = math.ceil(lag / 10) * 10
    elseif lag <= 10000 then bucket = math.ceil(lag / 100) * 100
    elseif lag <= 60000 then bucket = math.ceil(lag / 1000) * 1000 end
    buckets[bucket] = (buckets[bucket] or 0) + 1
    total = total + lag
  end
  for bucket, n in pairs(buckets) do redis.call('HINCRBY', key, bucket, n) end
  redis.call('HINCRBY', key, 'count', last - first + 1)
  redis.call('HINCRBY', key, 'sum_ms', total)
end
"""
NOT_BUCKETS = ("count", "sum_ms")


def entry_millis(log_ids: Iterable[str]) -> list[int]:
    """The entries' append times, as `count_apply_lag` takes them."""
    return [streamids.millis(log_id) for log_id in log_ids]


def lag_counts(raw: Mapping[bytes, bytes]) -> dict[float, int]:
    """A stored histogram as {upper bound in ms: events}, the +Inf bucket as `math.inf`."""
    counts: dict[float, int] = {}
    for field, value in raw.items():
        name = text(field)
        if name not in NOT_BUCKETS:
            counts[math.inf if name == "inf" else float(name)] = int(value)
    return counts


def percentile_ms(counts: Mapping[float, int], share: float) -> float | None:
    """The upper bound of the bucket holding the `share` quantile (exact below 100 ms)."""
    events = sum(counts.values())
    if not events:
        return None
    rank, seen = math.ceil(share * events), 0
    for bound in sorted(counts):
        seen += counts[bound]
        if seen >= rank:
            return bound
    return math.inf
