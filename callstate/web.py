"""The application factory: settings, one Redis client, the blueprints and the error answers."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask, Response
from redis import Redis
from redis.exceptions import RedisClusterException, RedisError
from rq import Queue
from werkzeug.exceptions import HTTPException

from callstate.apidoc import apidoc
from callstate.board import board
from callstate.config import Settings
from callstate.connection import connect, connect_queue, distinct
from callstate.doctor import warn_if_unsafe
from callstate.health import health
from callstate.history_api import history
from callstate.http import Services, error, mark_store_unchecked
from callstate.keys import Keys
from callstate.lookups import calls
from callstate.metrics import install as install_metrics
from callstate.migration import refuse_unmigrated, unmigrated
from callstate.store import Store
from callstate.webhook import webhooks

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, redis: Redis | None = None, queue_redis: Redis | None = None
) -> Flask:
    """Application factory: settings from the environment unless given, one client for the data
    Redis and one for RQ's (the same one unless the settings name a queue server)."""
    settings = settings or Settings.from_env()
    redis = redis or connect(settings)
    queue_redis = queue_redis or connect_queue(settings, redis)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    store = Store(redis, settings, queue_redis)
    checked = refuse_unmigrated(redis, queue_redis, store.keys)
    app.extensions["callstate"] = Services(
        settings, store, Queue(settings.queue_name, connection=queue_redis)
    )
    app.register_blueprint(webhooks)
    app.register_blueprint(calls)
    app.register_blueprint(history)
    app.register_blueprint(apidoc)
    app.register_blueprint(board)
    app.register_blueprint(health)
    install_metrics(app)
    if not checked:  # after the metrics' own, which every answer counts on
        app.before_request(checked_first(redis, queue_redis, store.keys))
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(RedisError, _redis_down)
    app.register_error_handler(RedisClusterException, _redis_down)
    warn_if_exposed(settings)
    for server in distinct(redis, queue_redis):
        warn_if_unsafe(server)
    return app


def checked_first(
    redis: Redis, queue_redis: Redis, keys: Keys
) -> Callable[[], tuple[Response, int] | None]:
    """A `before_request` for a web whose start-up check could not be made (Redis did not
    answer): each request makes it until it passes, and is answered 503, saying why, while the
    store is to migrate. While the check meets Redis away, reads go on and meet that as before,
    and the webhook answers 503 without writing (Redis may be back by its append)."""
    passed: list[bool] = []

    def check() -> tuple[Response, int] | None:
        if passed:
            return None
        try:
            why = unmigrated(redis, queue_redis, keys)
        except RedisError:
            mark_store_unchecked()  # reads meet Redis themselves; writes are refused
            return None
        if why is not None:
            log.error("callstate: %s", why)
            return error(503, "unmigrated", why)
        passed.append(True)
        return None

    return check


def warn_if_exposed(settings: Settings) -> None:
    """Say loudly at start when anyone who can reach the port can forge events or read calls."""
    if not settings.exposed:
        return
    if not settings.signers:
        log.warning(
            "SECURITY: bound to %s without STRINGEE_SIGNING_SECRET: anyone who can reach this "
            "port can post call events",
            settings.host,
        )
    if settings.api_token is None:
        log.warning(
            "SECURITY: bound to %s without CALLSTATE_API_TOKEN: anyone who can reach this port "
            "can read calls and phone numbers",
            settings.host,
        )


def _http_error(exc: HTTPException) -> tuple[Response, int]:
    status = exc.code or 500
    code = (exc.name or "error").lower().replace(" ", "_")
    response, status = error(status, code, exc.description or code)
    # Keep what the exception's own answer says besides its HTML, such as a 405's `Allow`.
    response.headers.extend(
        (name, value) for name, value in exc.get_headers() if name.lower() != "content-type"
    )
    return response, status


def _redis_down(exc: Exception) -> tuple[Response, int]:
    log.warning("redis unavailable: %s: %s", type(exc).__name__, exc)
    return error(503, "unavailable", "the call store is unavailable; retry later")
