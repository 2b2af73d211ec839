"""An RQ worker that applies call events: `python -m workers.events` (run as many as you like)."""

from __future__ import annotations

import logging
from types import FrameType

from callstate import jobs
from workers.connect import connect
from workers.failover import StoppableWorker, work_through_failovers

log = logging.getLogger("workers.events")  # by name: under `python -m` it is __main__


class EventWorker(StoppableWorker):
    """RQ's in-process worker, whose drain job, on a warm shutdown, hands its shards over at its
    next slice's end rather than holding them while events keep coming."""

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        jobs.hand_over_shards()
        super().request_stop(signum, frame)


def main() -> None:
    settings, redis, queue_redis = connect()
    jobs.configure(settings, redis, queue_redis)

    # SimpleWorker runs drain jobs in this process, not in a fork per job (RQ's default Worker):
    # a job keeps this process's state machines, connection and threads, and a fork would cost
    # more than a short job's work.
    def new_worker() -> EventWorker:
        worker = EventWorker(
            [settings.queue_name], connection=queue_redis, worker_ttl=jobs.WORKER_TTL_SECONDS
        )
        log.info("worker %s started on queue %s", worker.name, settings.queue_name)
        return worker

    # RQ's own lines for every job (`Job OK`, `Result discarded`) are INFO: keep its warnings.
    work_through_failovers(new_worker, queue_redis, logging_level="WARNING")


if __name__ == "__main__":
    main()
