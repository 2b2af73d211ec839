"""What every worker-side process does first: read settings and wait for Redis."""

from __future__ import annotations

import logging

from redis import Redis

from callstate.config import Settings
from callstate.connection import connect as connect_redis
from callstate.doctor import warn_if_unsafe
from callstate.redis_server import wait_for_redis

REDIS_STARTUP_SECONDS = 30


def connect() -> tuple[Settings, Redis]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # transitions narrates every callback at INFO: one line per event is noise, not news.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    settings = Settings.from_env()
    redis = connect_redis(settings.redis_url)
    wait_for_redis(redis, REDIS_STARTUP_SECONDS)
    warn_if_unsafe(redis)
    return settings, redis
