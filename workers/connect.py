"""What every worker-side process does first: read settings, set up logging, wait for Redis."""

from __future__ import annotations

from redis import Redis

from callstate.config import Settings
from callstate.connection import connect as connect_redis
from callstate.connection import connect_queue, distinct
from callstate.doctor import warn_if_unsafe
from callstate.keys import Keys
from callstate.logs import configure_logging
from callstate.migration import NotMigratedError, refuse_unmigrated
from callstate.redis_server import wait_for_redis

REDIS_STARTUP_SECONDS = 30


def connect() -> tuple[Settings, Redis, Redis]:
    """The settings, the data Redis and the Redis of RQ's queues (the same client unless
    CALLSTATE_QUEUE_URL or CALLSTATE_QUEUE_SENTINEL_MASTER is set), both answering."""
    settings = Settings.from_env()
    configure_logging(settings.log_format)
    redis = connect_redis(settings)
    queue_redis = connect_queue(settings, redis)
    for server in distinct(redis, queue_redis):
        wait_for_redis(server, REDIS_STARTUP_SECONDS)
        warn_if_unsafe(server)
    try:
        refuse_unmigrated(redis, queue_redis, Keys(settings.key_prefix, settings.shards))
    except NotMigratedError as exc:
        raise SystemExit(f"callstate: {exc}") from None
    return settings, redis, queue_redis
