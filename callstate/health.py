"""Health checks for a load balancer or an orchestrator: `/healthz` (the process is up) and
`/readyz` (Redis answers, and the queue's Redis when it is another, a worker is alive, no shard
is falling behind, and with CALLSTATE_REPLICA_ACKS enough replicas are connected)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from flask import Blueprint, Response, jsonify
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.utils import now, utcparse

from callstate.connection import STORE_ERRORS, primaries
from callstate.figures import Backlog, shard_backlogs
from callstate.http import Services, services
from callstate.jobs import WORKER_TTL_SECONDS
from callstate.store import Store

# An RQ worker's key lives this long after its last heartbeat (the workers' TTL plus the 60 s RQ
# adds); an idle worker heartbeats every TTL - 15 s, so a younger heartbeat is live.
HEARTBEAT_HORIZON = timedelta(seconds=WORKER_TTL_SECONDS + 60)
UNAVAILABLE = {"ok": False, "error": "redis unavailable"}

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz() -> tuple[Response, int]:
    return jsonify({"status": "ok"}), 200


@health.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Six round trips at most, whatever the number of shards and workers: PING, the backlog
    (two), and INFO with replica acknowledgements, on the data Redis; a PING of the queue's
    Redis when it is another, the queue's worker set and their heartbeats (one pipeline)."""
    svc = services()
    data = _data_checks(svc)
    if svc.store.queue_redis is svc.store.redis:
        queue = {"workers": _workers_check(svc) if data["redis"]["ok"] else UNAVAILABLE}
    else:
        queue = _queue_checks(svc)
    checks = {"redis": data.pop("redis"), **queue, **data}
    failing = [name for name, check in checks.items() if not check["ok"]]
    body = {"status": "unready" if failing else "ready", "failing": failing, "checks": checks}
    return jsonify(body), 503 if failing else 200


def _data_checks(svc: Services) -> dict[str, dict[str, Any]]:
    required = svc.settings.replica_acks
    try:
        svc.store.redis.ping()
        checks = {
            "redis": {"ok": True},
            "backlog": _backlog_check(
                shard_backlogs(svc.store), svc.settings.ready_max_lag_seconds
            ),
        }
        if required:
            checks["replicas"] = _replicas_check(svc.store.redis, required)
        return checks
    except STORE_ERRORS as exc:
        return {
            "redis": {"ok": False, "error": str(exc)},
            "backlog": UNAVAILABLE,
            **({"replicas": UNAVAILABLE} if required else {}),
        }


def _queue_checks(svc: Services) -> dict[str, dict[str, Any]]:
    """The queue's own Redis (CALLSTATE_QUEUE_URL), then the workers registered there."""
    try:
        svc.store.queue_redis.ping()
    except RedisError as exc:
        return {"queue": {"ok": False, "error": str(exc)}, "workers": UNAVAILABLE}
    return {"queue": {"ok": True}, "workers": _workers_check(svc)}


def workers_running(store: Store) -> bool:
    """Whether a worker of the event queue or a records queue has a live heartbeat: it would
    apply, sweep (maintenance runs on it) or deliver while the store moves. Counted as /readyz
    counts them: RQ's registry keeps a worker killed outright until a live worker cleans it,
    which with every worker stopped is never."""
    settings = store.settings
    names = (settings.queue_name, settings.record_queue_name, settings.record_retry_queue_name)
    return any(live_workers(Queue(name, connection=store.queue_redis)) for name in names)


def live_workers(queue: Queue) -> int:
    """Workers of `queue` in RQ's own registry whose last heartbeat is within RQ's horizon.

    Reads the heartbeats itself rather than through `Worker.all`: building a `Worker` raises
    the client's socket timeout to the worker's dequeue timeout (415 s), which would take
    the web's fast failure away."""
    keys = Worker.all_keys(queue=queue)
    if not keys:
        return 0
    pipe = queue.connection.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(key, "last_heartbeat", "death")
    oldest = now() - HEARTBEAT_HORIZON
    return sum(
        1
        for heartbeat, death in cast(list[list[bytes | None]], pipe.execute())
        if heartbeat is not None and death is None and utcparse(heartbeat.decode()) > oldest
    )


def _workers_check(svc: Services) -> dict[str, Any]:
    try:
        live = live_workers(svc.queue)
    except RedisError:
        return UNAVAILABLE
    return {"ok": live > 0, "live": live}


def _replicas_check(redis: Redis, required: int) -> dict[str, Any]:
    """With fewer replicas connected than CALLSTATE_REPLICA_ACKS, every event gets a 503 (on a
    cluster, every event of the shards of the primary that has fewest)."""
    connected = min(
        int(server.info("replication").get("connected_slaves", 0)) for server in primaries(redis)
    )
    return {"ok": connected >= required, "connected": connected, "required": required}


def _backlog_check(backlogs: list[Backlog], max_lag_seconds: int) -> dict[str, Any]:
    ages = [b.oldest_seconds for b in backlogs if b.oldest_seconds is not None]
    oldest = max(ages, default=None)
    return {
        "ok": oldest is None or oldest <= max_lag_seconds,
        "max_lag_seconds": max_lag_seconds,
        "oldest_seconds": oldest,
        "by_shard": {str(b.shard): b.oldest_seconds for b in backlogs},
    }
