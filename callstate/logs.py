"""Logging for every process: the web (through gunicorn's `logconfig_dict`), the workers, the
scheduler and the CLI. Readable text by default; with `LOG_FORMAT=json`, one JSON object per
line, where the `extra` fields a log call passes (`call_id`, `shard`, `log_id`) are fields."""

from __future__ import annotations

import logging
import logging.config
import re
from typing import Any

from gunicorn.glogging import Logger as GunicornLogger
from pythonjsonlogger.json import JsonFormatter

from callstate.redact import mask_personal

TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(levelname)s %(name)s %(process)d %(message)s"
JSON_NAMES = {"levelname": "level", "name": "logger"}
# RQ logs every job at INFO (`Job OK`, `Result discarded`) and its cron scheduler every
# enqueue; transitions narrates every callback. Per-event noise, not news: their warnings stay.
QUIET_LOGGERS = ("rq", "transitions")
_QUERY = re.compile(r"\?[^\s'\"]*")


class HideRequestTargets(logging.Filter):
    """gunicorn logs a malformed request's line at WARNING, query string and all: a read token
    (`/?token=`) or a phone number (`?number=`) would land in the log. Cut queries, mask digits;
    drop the traceback of a board stream's send timeout."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
            # A board stream whose client stopped reading hit its send timeout: expected, and
            # the stream's end is all there is to it (gunicorn would log a traceback at ERROR).
            return False
        record.msg = mask_personal(_QUERY.sub("?…", record.getMessage()))
        record.args = ()
        return True


class NoAccessLog(GunicornLogger):  # type: ignore[misc]  # gunicorn has no type hints
    """gunicorn's logger without the access log (CALLSTATE_ACCESS_LOG off): with a logging
    config, gunicorn would format a line for every request before any level could drop it."""

    def access(self, *request: object) -> None:
        return None


def make_formatter(log_format: str) -> logging.Formatter:
    """The one formatter of every process, for `log_format` "text" or "json"."""
    if log_format == "json":
        return JsonFormatter(JSON_FIELDS, rename_fields=JSON_NAMES, timestamp="time")
    return logging.Formatter(TEXT_FORMAT)


def logging_config(log_format: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` schema: one handler on stderr at INFO, which gunicorn's
    error and access loggers write through too, and the quiet loggers held to warnings."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"callstate": {"()": make_formatter, "log_format": log_format}},
        "filters": {"hide_request_targets": {"()": HideRequestTargets}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "callstate",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {
                "level": "INFO",
                "propagate": True,
                "filters": ["hide_request_targets"],
            },
            "gunicorn.access": {"level": "INFO", "propagate": True},
            **{name: {"level": "WARNING"} for name in QUIET_LOGGERS},
        },
    }


def configure_logging(log_format: str) -> None:
    """Set up this process's logging, once, at its start; Python's warnings go through it too."""
    logging.config.dictConfig(logging_config(log_format))
    logging.captureWarnings(True)
