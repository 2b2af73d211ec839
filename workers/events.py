"""An RQ worker that applies call events: `python -m workers.events` (run as many as you like)."""

from __future__ import annotations

from rq.worker import SimpleWorker

from callstate import jobs
from workers.connect import connect


def main() -> None:
    settings, redis = connect()
    jobs.configure(settings, redis)
    # Drain jobs last milliseconds, so a fork per job (RQ's default Worker) would cost more than
    # the work; SimpleWorker runs them in this process, keeping one machine and one connection.
    SimpleWorker([settings.queue_name], connection=redis).work()


if __name__ == "__main__":
    main()
