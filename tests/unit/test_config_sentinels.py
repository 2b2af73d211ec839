"""REDIS_SENTINELS / REDIS_SENTINEL_MASTER values the configuration accepts but the service cannot
use as meant."""

from __future__ import annotations

from callstate.config import Settings
from callstate.connection import connect


def test_an_ipv6_sentinel_is_reached_at_its_address() -> None:
    """`[::1]:26379` (the bracketed form REDIS_URL takes) passes the check, but the brackets
    reach redis-py as part of the host name: every lookup of it fails ("Name or service not
    known"), so with IPv6 sentinels only, every event gets a 503."""
    settings = Settings.from_env(
        {"REDIS_SENTINELS": "[::1]:26379,127.0.0.1:26380", "REDIS_SENTINEL_MASTER": "cs"}
    )
    pool = connect(settings).connection_pool
    hosts = [
        sentinel.connection_pool.connection_kwargs["host"]
        for sentinel in pool.sentinel_manager.sentinels  # type: ignore[attr-defined]
    ]
    assert hosts == ["::1", "127.0.0.1"]


def test_a_sentinel_master_without_sentinels_is_refused() -> None:
    """REDIS_SENTINEL_MASTER alone (REDIS_SENTINELS misspelt, or only commas) is ignored: the
    processes run on the embedded Redis instead of refusing to start."""
    for sentinels in ({}, {"REDIS_SENTINELS": " , "}):
        env = {"REDIS_SENTINEL_MASTER": "cs", **sentinels}
        try:
            settings = Settings.from_env(env)
        except ValueError:
            continue
        raise AssertionError(f"{env} accepted: embedded Redis = {settings.embedded_redis}")
