"""The Redis client: fails fast, and never repeats a command that timed out."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from callstate.connection import REDIS_TIMEOUT_SECONDS, connect


def test_the_client_times_out_fast_and_retries_only_a_broken_connection_once() -> None:
    client = connect("redis://127.0.0.1:1/0")
    options = client.connection_pool.connection_kwargs
    assert options["socket_timeout"] == REDIS_TIMEOUT_SECONDS
    assert options["socket_connect_timeout"] == 2
    retry = options["retry"]
    assert retry._retries == 1
    assert RedisConnectionError in retry._supported_errors
    assert RedisTimeoutError not in retry._supported_errors
