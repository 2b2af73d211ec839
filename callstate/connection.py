"""The Redis client every process uses, and the reply helpers shared by the data modules."""

from __future__ import annotations

from typing import Any, cast

from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from redis.sentinel import Sentinel

from callstate.config import Settings, sentinel_address

REDIS_TIMEOUT_SECONDS = 5
# A sentinel answers from memory: one that takes longer is down, ask the next.
SENTINEL_TIMEOUT_SECONDS = 0.5
# redis-py types replies as bytes-or-str (it cannot know decode_responses); RQ needs bytes.
StreamRows = list[tuple[bytes, dict[bytes, bytes]]]


def text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def connect(settings: Settings) -> Redis:
    """The data Redis: REDIS_URL's server, or the primary that REDIS_SENTINELS name (redis-py's
    own Sentinel client, which finds the new primary after a failover)."""
    if not settings.sentinels:
        return connect_url(settings.redis_url)
    assert settings.sentinel_master is not None  # config requires it with sentinels
    return _primary(settings, settings.sentinel_master)


def connect_queue(settings: Settings, data: Redis) -> Redis:
    """The Redis of RQ's queues: CALLSTATE_QUEUE_URL's server, the primary the sentinels watch as
    CALLSTATE_QUEUE_SENTINEL_MASTER, or else `data` itself, also when they name the data Redis:
    a second client of it would be taken for another server, whose delivery state `data` holds
    (the refusal, then migrate-keys moving the dead letters onto themselves and deleting them)."""
    if settings.queue_url is not None and (
        settings.sentinels or settings.queue_url != settings.redis_url
    ):
        return connect_url(settings.queue_url)
    if settings.queue_sentinel_master not in (None, settings.sentinel_master):
        return _primary(settings, settings.queue_sentinel_master)
    return data


def distinct(*clients: Redis) -> list[Redis]:
    """The clients given, each once: the data and the queue's Redis are one client by default."""
    return list({id(client): client for client in clients}.values())


def _primary(settings: Settings, master: str) -> Redis:
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [_host_port(item) for item in settings.sentinels],
        # No retry against a sentinel: the client asks the next one instead.
        sentinel_kwargs={
            "socket_timeout": SENTINEL_TIMEOUT_SECONDS,
            "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS,
            "retry": Retry(NoBackoff(), retries=0),
        },
        **_fail_fast(),
    )
    return cast(Redis, sentinel.master_for(master))  # type: ignore[no-untyped-call]


def connect_url(url: str) -> Redis:
    return Redis.from_url(url, **_fail_fast())


def _fail_fast() -> dict[str, Any]:
    """A client that fails fast: redis-py's default retries back off for seconds, and a webhook
    that cannot store an event must answer 503 before the provider gives up on it.

    One immediate retry on a broken connection (a restarted server, a primary that failed over),
    none on a timeout: a command that timed out may have run, and an append run twice would log
    the event twice.
    """
    retry = Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,))
    return {
        "socket_timeout": REDIS_TIMEOUT_SECONDS,
        "socket_connect_timeout": 2,
        "retry": retry,
    }


def _host_port(item: str) -> tuple[str, int]:
    host, port = sentinel_address(item)
    return host, int(port)
