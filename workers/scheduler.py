"""RQ's own cron scheduler, enqueueing the maintenance job: `python -m workers.scheduler`."""

from __future__ import annotations

import logging
import math

from redis.exceptions import RedisError
from rq.cron import CronScheduler

from callstate import jobs
from callstate.redis_server import wait_for_redis
from workers.connect import connect

log = logging.getLogger("workers.scheduler")  # by name: under `python -m` it is __main__


def main() -> None:
    """Run the cron scheduler; when Redis fails under it (a hang, a restart), wait for Redis and
    start it again, as RQ's workers do, instead of exiting: under `make run` one process that
    exits stops them all."""
    settings, _, queue_redis = connect()
    log.info(
        "scheduler started: maintenance every %d s on queue %s",
        settings.maintenance_interval_seconds,
        settings.queue_name,
    )
    while True:
        cron = CronScheduler(connection=queue_redis)
        cron.register(
            jobs.maintain,
            queue_name=settings.queue_name,
            interval=settings.maintenance_interval_seconds,
            result_ttl=0,
        )
        try:
            cron.start()  # type: ignore[no-untyped-call]
            return
        except RedisError as exc:
            log.warning("scheduler lost Redis (%s); starting again once it answers", exc)
            wait_for_redis(queue_redis, math.inf)


if __name__ == "__main__":
    main()
