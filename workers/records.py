"""The RQ worker that forwards final records to their receivers: `python -m workers.records`."""

from __future__ import annotations

import logging

from rq.worker import SimpleWorker

from callstate import forwarding, jobs
from workers.connect import connect

log = logging.getLogger("workers.records")  # by name: under `python -m` it is __main__


def main() -> None:
    settings, redis = connect()
    forwarding.configure(settings, redis)
    # SimpleWorker: forward jobs send over this process's kept-alive connections. RQ's scheduler
    # runs here too: a failed delivery's next attempt is a scheduled job.
    worker = SimpleWorker(
        [settings.record_queue_name], connection=redis, worker_ttl=jobs.WORKER_TTL_SECONDS
    )
    log.info(
        "records worker %s started on queue %s: forwarding to %d receivers",
        worker.name,
        settings.record_queue_name,
        len(settings.record_webhook_urls),
    )
    # RQ's own lines for every job (`Job OK`, `Result discarded`) are INFO: keep its warnings.
    worker.work(logging_level="WARNING", with_scheduler=True)


if __name__ == "__main__":
    main()
