"""The pipeline's figures: counted with what they count, so a known burst moves them exactly."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

import callstate.calls
import callstate.codec
from callstate.config import Settings
from callstate.drain import Drainer
from callstate.eventlog import event_fields
from callstate.figures import read_figures, record_drain_seconds, shard_backlogs
from callstate.machine import CallMachine
from callstate.rebuild import rebuild
from callstate.store import Store
from tests.factories import body, event, known_burst

BURST = known_burst("fig")


def log_burst(store: Store) -> set[int]:
    return {store.log.append_event(p["call_id"], body(p))[1] for p in BURST}


def drain_all(store: Store, drainer: Drainer) -> None:
    for shard in range(store.settings.shards):
        drainer.drain(shard)


def test_a_known_burst_moves_every_figure_by_exactly_what_it_should(
    store: Store, drainer: Drainer
) -> None:
    shards = log_burst(store)
    waiting = read_figures(store)
    assert waiting.logged == len(BURST) and waiting.applied == 0
    assert sum(s.backlog.entries for s in waiting.shards) == len(BURST)
    for figures in waiting.shards:
        assert (figures.backlog.oldest_seconds is not None) == (figures.shard in shards)
    drain_all(store, drainer)
    done = read_figures(store)
    assert done.logged == done.applied == len(BURST)
    assert [s.backlog.entries for s in done.shards] == [0] * store.settings.shards
    assert [s.backlog.oldest_seconds for s in done.shards] == [None] * store.settings.shards
    assert done.verdicts == {"accepted": 5, "rejected:out_of_order": 1, "duplicate": 1}
    assert done.records == 1
    assert done.active == {"answered": 1, "ringing": 1} and done.active_total == 2


def test_verdicts_do_not_depend_on_batch_boundaries(
    settings: Settings, redis: Redis, store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    log_burst(store)
    drain_all(store, drainer)
    batched = read_figures(store)
    redis.flushall()
    one_at_a_time = Drainer(store, machine, 1, 60_000, 0, 0, wake=lambda shard: None)
    log_burst(store)
    drain_all(store, one_at_a_time)
    assert read_figures(store).verdicts == batched.verdicts


def test_the_sweeper_close_is_counted_and_the_call_leaves_the_active_counts(
    store: Store, drainer: Drainer
) -> None:
    _, shard, _ = store.log.append_event("fig-s", body(event("fig-s", "ringing", 100)))
    drainer.drain(shard)
    assert read_figures(store).active == {"ringing": 1}
    store.log.append_sweep("fig-s", store.log.server_time_ms() + 1)
    drainer.drain(shard)
    figures = read_figures(store)
    assert figures.verdicts == {"accepted": 1, "swept:stale": 1}
    assert figures.active == {} and figures.records == 1


def test_rebuild_counts_the_active_calls_anew(
    store: Store, drainer: Drainer, machine: CallMachine, redis: Redis
) -> None:
    log_burst(store)
    drain_all(store, drainer)
    for shard in range(store.settings.shards):
        redis.hset(store.keys.active_statuses(shard), "ringing", 99)
    rebuild(store, machine)
    assert read_figures(store).active == {"answered": 1, "ringing": 1}


def test_a_refused_delivery_is_counted_beyond_the_bounded_list(
    tmp_path: Path, redis: Redis
) -> None:
    small = Store(
        redis,
        Settings(
            redis_url="redis://fake", embedded_redis=False, var_dir=tmp_path, quarantine_max=2
        ),
    )
    for n in range(3):
        small.quarantine.add({"error": "invalid_json", "n": n})
    figures = read_figures(small)
    assert (figures.quarantined, figures.quarantine_size) == (3, 2)


def test_drain_durations_fall_in_cumulative_buckets(store: Store, redis: Redis) -> None:
    for seconds in (0.003, 0.003, 0.04, 20.0):
        record_drain_seconds(redis, store.keys, 1, seconds)
    histogram = read_figures(store).shards[1].drain_seconds
    counts = dict(histogram.buckets)
    assert (counts[0.0025], counts[0.005], counts[0.05], counts[10.0]) == (0, 2, 3, 3)
    assert counts[float("inf")] == histogram.count == 4
    assert histogram.sum == pytest.approx(20.046)


def test_the_backlog_alone_is_read_the_same_way(store: Store, drainer: Drainer) -> None:
    shards = log_burst(store)
    drainer.drain(min(shards))
    alone = shard_backlogs(store)
    with_the_rest = [s.backlog for s in read_figures(store).shards]
    assert [b.entries for b in alone] == [b.entries for b in with_the_rest]
    waiting = [b.shard for b in alone if b.oldest_seconds is not None]
    assert waiting == sorted(shards - {min(shards)})
    assert waiting == [b.shard for b in with_the_rest if b.oldest_seconds is not None]


def test_an_entry_set_aside_after_it_was_applied_counts_only_as_set_aside(
    store: Store, drainer: Drainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry whose result cannot be stored is rolled back, its verdict with it."""
    real_pack = callstate.codec.pack_doc

    def pack_unless_777(doc: Mapping[str, Any]) -> bytes:
        if doc["last_timestamp_ms"] == 777:
            raise ValueError("a document this entry made unstorable")
        return real_pack(doc)

    monkeypatch.setattr(callstate.calls, "pack_doc", pack_unless_777)
    for status, ts in (("ringing", 700), ("answered", 777), ("answered", 800)):
        _, shard, _ = store.log.append_event("fig-p", body(event("fig-p", status, ts)))
    drainer.drain(shard)
    assert read_figures(store).verdicts == {"accepted": 2, "rejected:unprocessable": 1}


def test_every_applied_entry_has_one_verdict_even_a_sweep_that_finds_the_call_alive(
    store: Store, drainer: Drainer
) -> None:
    _, shard, _ = store.log.append_event("fig-w", body(event("fig-w", "ringing", 100)))
    store.log.append_sweep("fig-w", store.log.server_time_ms() - 60_000)  # heard from since
    store.log.append_sweep("fig-gone", store.log.server_time_ms())  # no such call
    drainer.drain(shard)
    drainer.drain(store.keys.shard_of("fig-gone"))
    figures = read_figures(store)
    assert figures.verdicts == {"accepted": 1, "ignored:not_stale": 2}
    assert sum(figures.verdicts.values()) == figures.applied == 3


def test_a_count_that_drifted_below_zero_shows_in_the_totals(store: Store, redis: Redis) -> None:
    redis.hset(store.keys.active_statuses(3), "ringing", -1)
    redis.hset(store.keys.active_statuses(1), "answered", 2)
    assert read_figures(store).active == {"ringing": -1, "answered": 2}


def test_rebuild_sets_the_counters_of_a_store_logged_before_they_existed(
    store: Store, drainer: Drainer, machine: CallMachine, redis: Redis
) -> None:
    """An upgraded store: entries appended by the previous release (no count), some applied,
    some waiting, an active call counted nowhere. One rebuild makes the figures right."""
    shard = store.keys.shard_of("fig-u1")
    fields = event_fields("fig-u1", body(event("fig-u1", "ringing", 100)))
    redis.xadd(store.keys.log(shard), fields)  # as the previous release appended
    drainer.drain(shard)
    for ts in (200, 300):
        redis.xadd(
            store.keys.log(shard), event_fields("fig-u1", body(event("fig-u1", "answered", ts)))
        )
    for key in redis.keys(f"{store.settings.key_prefix}:{{s*}}:stats:*"):
        redis.delete(key)
    before = read_figures(store).shards[shard]
    assert before.backlog.entries == 1, "at least the entry seen waiting"
    assert before.active == {}
    rebuild(store, machine)
    after = read_figures(store).shards[shard]
    assert after.backlog.entries == 2
    assert after.active == {"ringing": 1}
    drainer.drain(shard)
    assert read_figures(store).shards[shard].backlog.entries == 0
    assert read_figures(store).active == {"answered": 1}
