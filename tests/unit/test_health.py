"""`/healthz` and `/readyz` through Flask's test client: each readiness check failing alone."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import fakeredis
import pytest
from flask.testing import FlaskClient
from redis import Redis
from redis.connection import Connection
from rq import Worker
from rq.utils import now, utcformat

from callstate.config import Settings
from callstate.eventlog import event_fields
from callstate.health import HEARTBEAT_HORIZON
from callstate.store import Store
from callstate.web import create_app
from tests.factories import body, event


def start_worker(redis: Redis, queue: str = Settings.queue_name) -> Worker:
    """A worker as RQ registers it when it starts, without running it, through a client of
    its own (as a worker process has; building a `Worker` changes its client's timeout)."""
    own = fakeredis.FakeRedis(server=redis.connection_pool.connection_kwargs["server"])
    worker = Worker([queue], connection=own)
    worker.register_birth()  # type: ignore[no-untyped-call]
    return worker


def readyz(client: FlaskClient, status: int) -> dict[str, Any]:
    response = client.get("/readyz")
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    found: dict[str, Any] = response.get_json()
    return found


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def redis_down(settings: Settings) -> FlaskClient:
    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    return create_app(down).test_client()


def test_healthz_answers_without_redis(redis_down: FlaskClient) -> None:
    response = redis_down.get("/healthz")
    assert (response.status_code, response.get_json()) == (200, {"status": "ok"})


def test_ready_with_redis_a_live_worker_and_no_backlog(client: FlaskClient, redis: Redis) -> None:
    start_worker(redis)
    assert readyz(client, 200) == {
        "status": "ready",
        "failing": [],
        "checks": {
            "redis": {"ok": True},
            "workers": {"ok": True, "live": 1},
            "backlog": {
                "ok": True,
                "max_lag_seconds": 30,
                "oldest_seconds": None,
                "by_shard": {"0": None, "1": None, "2": None, "3": None},
            },
        },
    }


def test_unready_without_a_worker(client: FlaskClient) -> None:
    found = readyz(client, 503)
    assert (found["status"], found["failing"]) == ("unready", ["workers"])
    assert found["checks"]["workers"] == {"ok": False, "live": 0}


def test_a_worker_that_left_or_fell_silent_or_serves_another_queue_is_not_live(
    client: FlaskClient, redis: Redis
) -> None:
    start_worker(redis).register_death()  # type: ignore[no-untyped-call]
    silent = start_worker(redis)
    long_ago = now() - HEARTBEAT_HORIZON - timedelta(seconds=1)
    redis.hset(silent.key, "last_heartbeat", utcformat(long_ago))
    start_worker(redis, queue="another-app")
    assert readyz(client, 503)["checks"]["workers"] == {"ok": False, "live": 0}
    start_worker(redis)
    assert readyz(client, 200)["checks"]["workers"] == {"ok": True, "live": 1}


def test_unready_when_a_shard_falls_behind(client: FlaskClient, redis: Redis, store: Store) -> None:
    start_worker(redis)
    _, fresh_shard, _ = store.log.append_event("fresh", body(event("fresh", "ringing", 1)))
    assert readyz(client, 200)["checks"]["backlog"]["by_shard"][str(fresh_shard)] < 30
    old_ms = store.log.server_time_ms() - 45_000
    stalled = next(s for s in range(4) if s != fresh_shard)
    fields = event_fields("old", body(event("old", "ringing", 1)))
    redis.xadd(store.keys.log(stalled), fields, id=f"{old_ms}-0")
    found = readyz(client, 503)
    assert found["failing"] == ["backlog"]
    backlog = found["checks"]["backlog"]
    assert backlog["ok"] is False and backlog["max_lag_seconds"] == 30
    assert backlog["oldest_seconds"] == backlog["by_shard"][str(stalled)]
    assert 45 <= backlog["oldest_seconds"] < 50


def test_the_lag_allowed_is_a_setting(settings: Settings, redis: Redis, store: Store) -> None:
    start_worker(redis)
    old_ms = store.log.server_time_ms() - 45_000
    redis.xadd(store.keys.log(0), event_fields("old", b"{}"), id=f"{old_ms}-0")
    patient = create_app(dataclasses.replace(settings, ready_max_lag_seconds=60), redis)
    assert readyz(patient.test_client(), 200)["checks"]["backlog"]["max_lag_seconds"] == 60


def test_unready_at_once_when_redis_is_down(redis_down: FlaskClient) -> None:
    started = time.monotonic()
    found = readyz(redis_down, 503)
    assert time.monotonic() - started < 2
    assert found["failing"] == ["redis", "workers", "backlog"]
    checks = found["checks"]
    assert checks["redis"]["ok"] is False and "Connection refused" in checks["redis"]["error"]
    unavailable = {"ok": False, "error": "redis unavailable"}
    assert checks["workers"] == checks["backlog"] == unavailable


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts what the clients send: one send per command or per pipeline."""
    sent = [0]
    original = Connection.send_packed_command

    def counting(self: Connection, *args: Any, **kwargs: Any) -> None:
        sent[0] += 1
        original(self, *args, **kwargs)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(Connection, "send_packed_command", counting)
    yield sent


def test_readyz_costs_six_round_trips_whatever_the_workers_and_shards(
    settings: Settings, redis: Redis, round_trips: list[int]
) -> None:
    many = create_app(dataclasses.replace(settings, shards=16), redis).test_client()
    for _ in range(3):
        start_worker(redis)
    round_trips[0] = 0
    readyz(many, 200)
    assert round_trips[0] == 6


def test_readyz_keeps_the_web_clients_fast_timeout(client: FlaskClient, redis: Redis) -> None:
    """`rq.Worker.all` would raise the shared client's socket timeout to minutes."""
    redis.connection_pool.connection_kwargs["socket_timeout"] = 5
    start_worker(redis)
    readyz(client, 200)
    assert redis.connection_pool.connection_kwargs["socket_timeout"] == 5
