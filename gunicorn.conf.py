"""gunicorn's settings and hooks, read from the working directory by every `gunicorn app:app`
(the Procfile's, the integration tests', the benchmark's)."""

from __future__ import annotations

import os

from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker

from callstate.config import Settings
from callstate.logs import NoAccessLog, logging_config

_settings = Settings.from_env()

# Logging: the service's own lines and gunicorn's in LOG_FORMAT; the access log only with
# CALLSTATE_ACCESS_LOG=on. It shows the path without its query string (`%(U)s`), which may carry
# a token or a number.
logconfig_dict = logging_config(_settings.log_format)
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(M)sms'
if not _settings.access_log:
    logger_class = NoAccessLog

# Prometheus multiprocess mode (callstate/metrics.py): each gunicorn process counts its own
# requests; `/metrics` adds up every process's figures from one directory. prometheus_client
# chooses where values live when it is imported, so the variable is set here, in the arbiter,
# before any worker imports the app (with `--preload` too).
# The directory is made here too: with `--preload` the app is loaded before `on_starting` runs.
if _settings.metrics:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_settings.metrics_dir)
    _settings.metrics_dir.mkdir(parents=True, exist_ok=True)


def on_starting(server: Arbiter) -> None:
    """Start from an empty directory: files left by an earlier run would be counted again."""
    if not _settings.metrics:
        return
    for stale in _settings.metrics_dir.glob("*.db"):
        stale.unlink()


def child_exit(server: Arbiter, worker: Worker) -> None:
    """A dead worker's live gauges go with it; its counters stay in the sum."""
    if not _settings.metrics:
        return
    # Imported here, not at the top: the import must follow the variable set above.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, path=str(_settings.metrics_dir))


def post_worker_init(worker: Worker) -> None:
    """The worker has set its signal handlers and loaded the app (in the arbiter, with
    `--preload`): now its board streams can be ended on SIGTERM ahead of gunicorn's handler."""
    # Imported here, not at the top: the app's modules must follow the variable set above.
    from callstate.board import stop_streams_on_sigterm

    stop_streams_on_sigterm(worker.wsgi)
