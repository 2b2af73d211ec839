"""An RQ worker that applies call events: `python -m workers.events` (run as many as you like)."""

from __future__ import annotations

from rq import Worker

from callstate import jobs
from workers.connect import connect


def main() -> None:
    settings, redis = connect()
    # Configured before RQ forks its work horses, so each job inherits the one state machine.
    jobs.configure(settings, redis)
    Worker([settings.queue_name], connection=redis).work()


if __name__ == "__main__":
    main()
