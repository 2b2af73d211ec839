"""The Redis client every process uses, and the reply helpers shared by the data modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from redis import ConnectionPool, Redis, RedisCluster
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry
from redis.sentinel import Sentinel

from callstate.config import Settings, server_address

REDIS_TIMEOUT_SECONDS = 5
# A sentinel answers from memory: one that takes longer is down, ask the next.
SENTINEL_TIMEOUT_SECONDS = 0.5
# What a store that does not answer raises: besides RedisError, redis-py's cluster client raises
# RedisClusterException (no RedisError) when no node answers or no node holds a slot.
STORE_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)
# redis-py types replies as bytes-or-str (it cannot know decode_responses); RQ needs bytes.
StreamRows = list[tuple[bytes, dict[bytes, bytes]]]


def text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def connect(settings: Settings) -> Redis:
    """The data Redis: REDIS_URL's server, the primary that REDIS_SENTINELS name (redis-py's
    own Sentinel client, which finds the new primary after a failover), or the cluster of
    CALLSTATE_REDIS_CLUSTER_NODES."""
    if settings.cluster_nodes:
        return _cluster(settings)
    if not settings.sentinels:
        return connect_url(settings.redis_url)
    assert settings.sentinel_master is not None  # config requires it with sentinels
    return _primary(settings, settings.sentinel_master)


def _cluster(settings: Settings) -> Redis:
    """redis-py's cluster client, typed as the client it stands in for: it answers the same
    commands, and every transaction, script and multi-key command here stays in one shard's
    hash tag. One retry, on a slot map read again, as one Redis gets one on a broken connection;
    redis-py makes it on a timeout too, so a hung primary holds a call up to twice the timeout,
    and an append retried after it ran is logged twice and applied once, as a delivery sent
    twice is."""
    client = RedisCluster(
        startup_nodes=[
            ClusterNode(*_host_port(item))  # type: ignore[no-untyped-call]
            for item in settings.cluster_nodes
        ],
        retry=Retry(NoBackoff(), retries=1),
        socket_timeout=REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=2,
    )
    return cast(Redis, client)


def is_cluster(redis: Redis) -> bool:
    return isinstance(redis, RedisCluster)


def server_of(redis: Redis, key: str) -> Redis:
    """The client of the one server that holds `key`: `redis` itself, or on a cluster that
    key's primary, for commands that must share a connection (WAIT counts the writes of the
    connection it is sent on). After an error with it, call `forget_routes`."""
    if isinstance(redis, RedisCluster):
        return cast(Redis, redis.get_redis_connection(redis.get_node_from_key(key)))
    return redis


@contextmanager
def watched_transaction(redis: Redis, key: str) -> Iterator[Pipeline]:
    """A WATCH/MULTI/EXEC pipeline on the server that holds `key`, for a transaction fenced by
    what it watches. Not the cluster client's own: after a broken connection or a timeout it
    sends MULTI/EXEC again on a new connection without the WATCH, so the transaction ran over
    whatever changed meanwhile. A server's own client raises WatchError there instead."""
    try:
        with server_of(redis, key).pipeline(transaction=True) as pipe:
            yield pipe
    except RedisError:
        forget_routes(redis)
        raise


def primaries(redis: Redis) -> list[Redis]:
    """A client of each primary: `redis` itself, or each of a cluster's."""
    if isinstance(redis, RedisCluster):
        return [cast(Redis, redis.get_redis_connection(node)) for node in redis.get_primaries()]
    return [redis]


def every_server(redis: Redis) -> list[Redis]:
    """A client of each server whose settings the guarantees rest on: `redis` itself, or each of
    a cluster's nodes, replicas too (a replica promoted keeps its own settings)."""
    if isinstance(redis, RedisCluster):
        return [cast(Redis, redis.get_redis_connection(node)) for node in redis.get_nodes()]
    return [redis]


def forget_routes(redis: Redis) -> None:
    """On a cluster, read which primary holds which slots again: the one `server_of` gave may
    have failed over."""
    if isinstance(redis, RedisCluster):
        redis.nodes_manager.initialize()


def get_many(redis: Redis, keys: list[str]) -> list[bytes | None]:
    """The values of keys that may lie in different shards: one `MGET`, or on a cluster redis-py's
    `mget_nonatomic` (one `MGET` per hash slot, pipelined), atomic per shard only."""
    if isinstance(redis, RedisCluster):
        return cast(list[bytes | None], redis.mget_nonatomic(keys))
    return cast(list[bytes | None], redis.mget(keys))


def connect_queue(settings: Settings, data: Redis) -> Redis:
    """The Redis of RQ's queues: CALLSTATE_QUEUE_URL's server, the primary the sentinels watch as
    CALLSTATE_QUEUE_SENTINEL_MASTER, or else `data` itself, also when they name the data Redis:
    a second client of it would be taken for another server, whose delivery state `data` holds
    (the refusal, then migrate-keys moving the dead letters onto themselves and deleting them)."""
    if settings.queue_url is not None and (
        settings.sentinels or settings.cluster_nodes or settings.queue_url != settings.redis_url
    ):
        return connect_url(settings.queue_url)
    if settings.queue_sentinel_master not in (None, settings.sentinel_master):
        return _primary(settings, settings.queue_sentinel_master)
    return data


def command_list() -> Pipeline:
    """A pipeline of no server, never executed: it only queues commands for a script to run (a
    cluster client's pipeline refuses some that a script may run, PUBLISH among them)."""
    return Pipeline(ConnectionPool(), {}, transaction=False, shard_hint=None)


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
    host, port = server_address(item)
    return host, int(port)
