"""The Redis client: fails fast, and never repeats a command that timed out."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import MasterNotFoundError, SentinelConnectionPool

from callstate.config import Settings
from callstate.connection import REDIS_TIMEOUT_SECONDS, connect, connect_url


def test_the_client_times_out_fast_and_retries_only_a_broken_connection_once() -> None:
    client = connect_url("redis://127.0.0.1:1/0")
    options = client.connection_pool.connection_kwargs
    assert options["socket_timeout"] == REDIS_TIMEOUT_SECONDS
    assert options["socket_connect_timeout"] == 2
    retry = options["retry"]
    assert retry._retries == 1
    assert RedisConnectionError in retry._supported_errors
    assert RedisTimeoutError not in retry._supported_errors


def test_with_sentinels_the_client_asks_them_for_the_primary_and_fails_as_fast() -> None:
    settings = Settings.from_env(
        {"REDIS_SENTINELS": "127.0.0.1:1,127.0.0.1:2", "REDIS_SENTINEL_MASTER": "cs"}
    )
    client = connect(settings)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "cs"
    assert [
        sentinel.connection_pool.connection_kwargs["port"]
        for sentinel in pool.sentinel_manager.sentinels
    ] == [1, 2]
    assert pool.connection_kwargs["socket_timeout"] == REDIS_TIMEOUT_SECONDS
    # redis-py's default retries against each sentinel made this take 16 s: a webhook's 503 late.
    for sentinel in pool.sentinel_manager.sentinels:
        assert sentinel.connection_pool.connection_kwargs["retry"]._retries == 0
    with pytest.raises(MasterNotFoundError):
        client.ping()
