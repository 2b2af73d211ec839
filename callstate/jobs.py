"""The RQ jobs: drain a shard, and the periodic maintenance that sweeps silent calls.

RQ finds job functions by import path, so the worker entry point hands them their settings
and connection with `configure` before it starts working.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker

from callstate.config import Settings
from callstate.drain import Drainer
from callstate.figures import record_drain_seconds
from callstate.forwarding import Forwarder
from callstate.machine import CallMachine
from callstate.retention import Retention
from callstate.snapshots import Snapshots
from callstate.store import Store

log = logging.getLogger(__name__)
DRAIN_JOB = "callstate.jobs.drain_shard"
FAILED_DRAIN_TTL_SECONDS = 24 * 3600
SWEEP_BATCH = 1000
# How long RQ keeps a worker's registry key after its last heartbeat, less 60 s (RQ adds them);
# an idle worker heartbeats every WORKER_TTL_SECONDS - 15 s. RQ's default (420 s) would let a
# worker killed outright look alive to `/readyz` for 8 minutes; this, for 2.
WORKER_TTL_SECONDS = 60
# Snapshot steps per shard and maintenance run: enough to catch up on a day's log in a few runs,
# few enough that one run never holds a shard for long.
SNAPSHOT_STEPS = 20


@dataclass(frozen=True)
class Context:
    settings: Settings
    store: Store
    queue: Queue
    drainer: Drainer
    snapshots: Snapshots
    forwarder: Forwarder | None = None


_context: Context | None = None
# Set when the worker is asked to stop: its drain job hands its shards over at a slice's end.
_stopping = threading.Event()


def configure(settings: Settings, redis: Redis, queue_redis: Redis | None = None) -> Context:
    """Set up this process's store, queue and its single state machine for the jobs below; RQ's
    queues are on `queue_redis` when given, else on the data Redis."""
    global _context
    store = Store(redis, settings, queue_redis)
    queue = Queue(settings.queue_name, connection=store.queue_redis)
    machine = CallMachine()
    forwarder = Forwarder(redis, settings, store.queue_redis) if settings.forwarding else None
    drainer = Drainer(
        store,
        machine,
        batch=settings.drain_batch,
        slice_ms=settings.drain_slice_ms,
        linger_ms=settings.drain_linger_ms,
        window_ms=settings.drain_window_ms,
        wake=lambda shard: wake_drain(store, queue, shard, drain_timeout(settings)),
        on_records=forwarder.wake if forwarder is not None else None,
        shards_per_job=lambda: shards_per_worker(settings, queue),
        others_waiting=lambda: queue.count > 0,
        stopping=_stopping.is_set,
    )
    _context = Context(
        settings=settings,
        store=store,
        queue=queue,
        drainer=drainer,
        snapshots=Snapshots(store, machine),
        forwarder=forwarder,
    )
    return _context


def hand_over_shards() -> None:
    """The worker is stopping (warm shutdown): its drain job leaves at its next slice's end."""
    _stopping.set()


def context() -> Context:
    if _context is None:
        raise RuntimeError("callstate jobs run in a worker started by workers/events.py")
    return _context


def shards_per_worker(settings: Settings, queue: Queue) -> int:
    """How many shards one drain job takes, so that the live workers together wait on all."""
    return math.ceil(settings.shards / max(1, Worker.count(queue=queue)))


def drain_timeout(settings: Settings) -> int:
    """RQ's limit for one drain job: a slice is short, a lost lock is the real bound."""
    return settings.drain_lock_seconds * 4


def wake_drain(store: Store, queue: Queue, shard: int, job_timeout: int) -> bool:
    """Queue a drain of the shard unless one is queued already; True if this call queued it."""
    wake_id = store.coordination.wakes.claim(shard)
    if wake_id is None:
        return False
    enqueue_drain(queue, shard, job_timeout, wake_id)
    return True


def enqueue_drain(queue: Queue, shard: int, job_timeout: int, job_id: str | None = None) -> None:
    """Wake a drain of the shard; results are not kept, the call documents are the result. A
    failed job is kept a day for inspection, not RQ's default year."""
    queue.enqueue(
        DRAIN_JOB,
        shard,
        job_id,
        job_id=job_id,
        job_timeout=job_timeout,
        result_ttl=0,
        failure_ttl=FAILED_DRAIN_TTL_SECONDS,
        description=f"drain shard {shard}",
    )


def drain_shard(shard: int, wake_id: str | None = None) -> int:
    """The drain job; its duration is counted for `/metrics` (best effort: a Redis that fails
    here has failed the drain already, or will fail the next one)."""
    ctx = context()
    started = time.monotonic()
    try:
        return ctx.drainer.drain(shard, wake_id)
    finally:
        with contextlib.suppress(RedisError):
            record_drain_seconds(ctx.store.redis, ctx.store.keys, shard, time.monotonic() - started)


def _rewake_if_lost(store: Store, queue: Queue, shard: int, job_timeout: int) -> bool:
    if store.coordination.held_by_its_flag(shard):
        return False
    wake_id = store.coordination.wakes.replace_lost(shard, queue)
    if wake_id is None:
        return False
    enqueue_drain(queue, shard, job_timeout, wake_id)
    return True


def advance_snapshots(ctx: Context, now_ms: int) -> int:
    """Move each shard's snapshot up to retention once its log holds a snapshot interval more;
    return how many calls were retired."""
    before_ms = Retention.of(ctx.settings).snapshot_before(now_ms)
    retired = 0
    for shard in range(ctx.settings.shards):
        if not ctx.snapshots.due(shard, now_ms):
            continue
        try:
            retired += _advance_shard(ctx, shard, before_ms)
        except RedisError:
            raise
        except Exception:  # one shard's snapshot must not keep the others woken and swept
            log.exception(
                "shard %s: snapshot step failed; left for the next run",
                shard,
                extra={"shard": shard},
            )
    return retired


def _advance_shard(ctx: Context, shard: int, before_ms: int) -> int:
    retired = 0
    for _ in range(SNAPSHOT_STEPS):
        step = ctx.snapshots.advance(shard, before_ms)
        if step is None or step.entries == 0:
            break
        retired += step.retired
    return retired


def maintain() -> dict[str, int]:
    """Advance the snapshots (retiring ended calls, trimming the log), drop records past their
    retention, wake stuck shards, ask for silent calls to be closed.

    In that order: trimming frees memory and waking needs none, so a Redis that is full still
    gets its backlog woken; and a drain job that found a shard locked by a snapshot step is
    woken again here.
    """
    ctx = context()
    settings, store = ctx.settings, ctx.store
    now_ms = store.log.server_time_ms()
    retired = advance_snapshots(ctx, now_ms)
    trimmed = store.history.trim(now_ms)
    timeout = drain_timeout(settings)
    woken = [
        shard
        for shard in range(settings.shards)
        if store.log.has_backlog(shard)
        and (
            wake_drain(store, ctx.queue, shard, timeout)
            or _rewake_if_lost(store, ctx.queue, shard, timeout)
        )
    ]
    stale_before = now_ms - settings.stale_after_seconds * 1000
    stale = store.docs.stale_call_ids(stale_before, SWEEP_BATCH)
    for call_id in stale:
        _, shard, wake_id = store.log.append_sweep(call_id, stale_before)
        if wake_id is not None:
            enqueue_drain(ctx.queue, shard, timeout, wake_id)
    if ctx.forwarder is not None:  # a forward wake lost to a crash
        ctx.forwarder.wake_stuck()
    if stale or woken or retired or trimmed:
        log.info(
            "maintenance: %d calls to close, %d shards woken, %d calls retired, "
            "%d records past their retention dropped",
            len(stale),
            len(woken),
            retired,
            trimmed,
        )
    return {"stale": len(stale), "woken": len(woken), "retired": retired, "trimmed": trimmed}
