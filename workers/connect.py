"""What every worker-side process does first (read settings, set up logging, wait for Redis), and
how its RQ worker outlives a Redis that fails under it."""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq.worker import BaseWorker

from callstate.config import Settings
from callstate.connection import connect as connect_redis
from callstate.doctor import warn_if_unsafe
from callstate.logs import configure_logging
from callstate.redis_server import wait_for_redis

log = logging.getLogger("workers")
REDIS_STARTUP_SECONDS = 30


def connect() -> tuple[Settings, Redis]:
    settings = Settings.from_env()
    configure_logging(settings.log_format)
    redis = connect_redis(settings)
    wait_for_redis(redis, REDIS_STARTUP_SECONDS)
    warn_if_unsafe(redis)
    return settings, redis


def work_through_failovers(new_worker: Callable[[], BaseWorker], redis: Redis, **work: Any) -> None:
    """Run an RQ worker's loop, and a new worker's whenever Redis failing ended it: RQ quits when
    it cannot record a job's end (a primary failing over, a restart), and under `make run` one
    process that exits stops them all."""
    while True:
        worker = new_worker()
        try:
            worker.work(**work)
            return
        except RedisError as exc:
            if worker._stop_requested:  # RQ's flag: a stop was asked for before Redis failed
                return
            log.warning(
                "worker %s lost Redis (%s); a new one starts once it answers", worker.name, exc
            )
            # RQ's handlers only flag a stop for its loop, which has ended: stop at once instead.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            wait_for_redis(redis, math.inf)
