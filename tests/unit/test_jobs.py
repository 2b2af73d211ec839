"""Periodic maintenance: silent calls are closed through the log; stuck shards are woken."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from redis import Redis

from callstate import coordination, jobs
from callstate.config import Settings
from callstate.snapshots import Advanced
from callstate.store import Store
from tests.factories import body, event, published, record_of


@pytest.fixture
def context(settings: Settings, redis: Redis) -> jobs.Context:
    return jobs.configure(dataclasses.replace(settings, stale_after_seconds=60), redis)


def log_at(store: Store, ms: int, payload: dict[str, Any]) -> int:
    """Log an event with a chosen log time, as if the webhook had received it back then."""
    call_id: str = payload["call_id"]
    shard = store.keys.shard_of(call_id)
    store.redis.xadd(
        store.keys.log(shard), {"call_id": call_id, "event": body(payload)}, id=f"{ms}-0"
    )
    return shard


def test_maintenance_closes_silent_calls_via_the_log(context: jobs.Context) -> None:
    store = context.store
    now = store.log.server_time_ms()
    silent = log_at(store, now - 120_000, event("silent", "ringing", 1))
    log_at(store, now - 1_000, event("recent", "ringing", 1))
    for shard in range(context.settings.shards):
        jobs.drain_shard(shard)
    result = jobs.maintain()
    assert result["stale"] == 1
    assert context.queue.count >= 1
    assert store.log.has_backlog(silent)
    jobs.drain_shard(silent)
    doc = store.docs.get_doc("silent")
    assert doc is not None
    assert doc["status"] == "ended"
    assert record_of(doc)["closed_by"] == "sweeper"
    recent = store.docs.get_doc("recent")
    assert recent is not None
    assert recent["status"] == "ringing"
    assert store.docs.stale_call_ids(now - 60_000, 10) == []
    records = published(store.redis, store.keys)
    assert [fields[b"call_id"] for _, fields in records] == [b"silent"]


def test_maintenance_wakes_a_shard_whose_wake_up_was_lost(
    context: jobs.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = context.store
    # The webhook claimed the wake flag, then its process died before it queued the job.
    _, shard, claimed = store.log.append_event("c-1", body(event("c-1", "ringing", 1)))
    assert claimed is not None and context.queue.count == 0
    assert jobs.maintain()["woken"] == 0, "a fresh flag's job may be being queued right now"
    monkeypatch.setattr(coordination, "LOST_WAKE_GRACE_MS", 0)
    assert jobs.maintain()["woken"] == 1
    [job] = context.queue.jobs
    assert job.func_name == jobs.DRAIN_JOB
    assert job.args == (
        shard,
        store.coordination.wakes.holder(shard),
    ) and job.id == store.coordination.wakes.holder(shard)
    assert jobs.maintain()["woken"] == 0, "its job is queued: one is enough"
    assert context.queue.count == 1
    assert context.queue.pop_job_id() == job.id  # as a worker takes it
    jobs.drain_shard(*job.args)
    assert store.coordination.wakes.holder(shard) is None and not store.log.has_backlog(shard)


def test_snapshots_never_cover_entries_not_yet_applied(context: jobs.Context) -> None:
    store, snapshots = context.store, context.snapshots
    shard = log_at(store, 1_000, event("old", "ringing", 1))
    log_at(store, 2_000, event("old", "answered", 2))
    assert snapshots.advance(shard, 10_000) == Advanced(None, 0, 0, 0)
    assert len(store.log.read_entries(shard, None, 10)) == 2
    jobs.drain_shard(shard)
    log_at(store, 20_000, event("old", "ended", 3))
    assert snapshots.advance(shard, 10_000) == Advanced("2000-0", 2, 0, 1)
    assert [e.log_id for e in store.log.read_entries(shard, None, 10)] == ["20000-0"]


def test_maintenance_moves_a_snapshot_only_once_the_log_outgrew_retention(
    context: jobs.Context,
) -> None:
    store, settings = context.store, context.settings
    now = store.log.server_time_ms()
    retention_ms = settings.retention_seconds * 1000
    interval_ms = settings.snapshot_interval_seconds * 1000
    shard = log_at(store, now - retention_ms - interval_ms + 60_000, event("a", "ringing", 1))
    jobs.drain_shard(shard)
    jobs.maintain()
    assert context.snapshots.position(shard) is None, "not yet an interval past retention"
    log_at(store, now - retention_ms - interval_ms - 60_000, event("b", "ringing", 1))
    jobs.drain_shard(store.keys.shard_of("b"))
    jobs.maintain()
    assert context.snapshots.position(store.keys.shard_of("b")) is not None


def test_jobs_refuse_to_run_unconfigured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "_context", None)
    with pytest.raises(RuntimeError, match=r"workers/events\.py"):
        jobs.drain_shard(0)


def test_maintenance_rewakes_a_shard_whose_worker_died_holding_its_job(
    context: jobs.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = context.store
    _, shard, claimed = store.log.append_event("c-1", body(event("c-1", "ringing", 1)))
    assert claimed is not None
    jobs.enqueue_drain(context.queue, shard, 60, claimed)
    # A worker takes the job off the queue and dies before running it: RQ still marks it queued.
    assert context.queue.pop_job_id() == claimed
    monkeypatch.setattr(coordination, "LOST_WAKE_GRACE_MS", 0)
    assert jobs.maintain()["woken"] == 1
    [job] = context.queue.jobs
    assert job.id == store.coordination.wakes.holder(shard) != claimed
