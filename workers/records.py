"""The RQ workers that forward final records to their receivers: `python -m workers.records`
runs the forward jobs (every receiver's new revisions), `python -m workers.records --retries` the
delivery jobs (failed deliveries' next attempts), each on its own queue."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from callstate import forwarding, jobs
from workers.connect import connect
from workers.failover import StoppableWorker, work_through_failovers

log = logging.getLogger("workers.records")  # by name: under `python -m` it is __main__
# Below the event workers' CPU priority: on a busy machine forwarding yields to applying events,
# and the outbox holds what it has not sent yet (measured by `python -m bench.forwarding`).
NICENESS = 10


def lower_cpu_priority(niceness: int) -> None:
    """`os.nice`, and the same for this process's autogroup: under Linux's autogroups (on by
    default) a process started in a session of its own, as the Procfile's and a supervisor's
    are, competes for the CPU as its group, whose priority only /proc sets. Only when this
    process leads its session: the group would be others' too otherwise."""
    os.nice(niceness)
    if os.getsid(0) != os.getpid():
        return  # the autogroup is a session's: this process may share it with others
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(niceness))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--retries"]):
        sys.exit("usage: python -m workers.records [--retries]")
    lower_cpu_priority(NICENESS)
    settings, redis, queue_redis = connect()
    forwarding.configure(settings, redis, queue_redis)
    queue = settings.record_retry_queue_name if args else settings.record_queue_name

    # SimpleWorker: forward jobs send over this process's kept-alive connections. RQ's scheduler
    # runs here too: a failed delivery's next attempt is a scheduled job.
    def new_worker() -> StoppableWorker:
        worker = StoppableWorker(
            [queue], connection=queue_redis, worker_ttl=jobs.WORKER_TTL_SECONDS
        )
        log.info(
            "records worker %s started on queue %s: forwarding to %d receivers",
            worker.name,
            queue,
            len(settings.record_webhook_urls),
        )
        return worker

    # RQ's own lines for every job (`Job OK`, `Result discarded`) are INFO: keep its warnings.
    work_through_failovers(new_worker, queue_redis, logging_level="WARNING", with_scheduler=True)


if __name__ == "__main__":
    main()
