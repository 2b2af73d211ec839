"""What every worker-side process does first: read settings, set up logging, wait for Redis."""

from __future__ import annotations

from redis import Redis

from callstate.config import Settings
from callstate.connection import connect as connect_redis
from callstate.doctor import warn_if_unsafe
from callstate.logs import configure_logging
from callstate.redis_server import wait_for_redis

REDIS_STARTUP_SECONDS = 30


def connect() -> tuple[Settings, Redis]:
    settings = Settings.from_env()
    configure_logging(settings.log_format)
    redis = connect_redis(settings)
    wait_for_redis(redis, REDIS_STARTUP_SECONDS)
    warn_if_unsafe(redis)
    return settings, redis
