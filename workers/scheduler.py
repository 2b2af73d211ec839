"""RQ's own cron scheduler, enqueueing the maintenance job: `python -m workers.scheduler`."""

from __future__ import annotations

from rq.cron import CronScheduler

from callstate import jobs
from workers.connect import connect


def main() -> None:
    settings, redis = connect()
    cron = CronScheduler(connection=redis)
    cron.register(
        jobs.maintain,
        queue_name=settings.queue_name,
        interval=settings.maintenance_interval_seconds,
        result_ttl=0,
    )
    cron.start()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
