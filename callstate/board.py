"""The live call board: the page, its first picture (`/board/state`) and its live updates
(`/board/events`, Server-Sent Events fed by the drainers' commits through `BoardFeed`)."""

from __future__ import annotations

import hmac
import json
import queue
import select
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import asdict
from typing import Any, cast

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
)
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue

from callstate import recordstream
from callstate.boardfeed import BoardFeed, Stream, read_backlog
from callstate.boardview import Summary, call_summary, record_summary
from callstate.connection import text
from callstate.figures import read_forwarding
from callstate.http import TOKEN_COOKIE, error, require_read_token, services
from callstate.store import Store

ACTIVE_SHOWN = 500
RECORDS_SHOWN = 20
REJECTIONS_SHOWN = 20
HEARTBEAT_SECONDS = 15.0
RETRY_MS = 2000
# How long one write to a board stream may block: gunicorn writes to a blocking socket, so
# without it a client that stops reading (or vanished without a word) holds its thread for good.
SEND_TIMEOUT_SECONDS = 5.0
# How often a waiting stream looks whether its client left; how long sent bytes may go
# unacknowledged before the kernel drops the connection.
WAIT_SLICE_SECONDS = 0.5
UNACKED_LIMIT_MS = 20_000
TOKEN_COOKIE_SECONDS = 30 * 24 * 3600
# Only the package's own files: no inline script or style, no other origin.
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"

board = Blueprint(
    "board",
    __name__,
    static_folder="static",
    static_url_path="/board/static",
    template_folder="templates",
)


@board.record_once
def _create_feed(state: BlueprintSetupState) -> None:
    svc = state.app.extensions["callstate"]
    state.app.extensions["callstate.board"] = BoardFeed(svc.store, svc.settings.board_streams)


def stop_streams_on_sigterm(app: object) -> None:
    """From gunicorn's `post_worker_init` hook: end the worker's board streams on SIGTERM before
    its own handler runs (with `--preload` too, where the app is built before that handler)."""
    if isinstance(app, Flask) and "callstate.board" in app.extensions:
        cast(BoardFeed, app.extensions["callstate.board"]).stop_on_sigterm()


def board_feed() -> BoardFeed:
    return cast(BoardFeed, current_app.extensions["callstate.board"])


@board.before_request
def _guard() -> tuple[Response, int] | None:
    """The read token, but for the page's own files and for `/?token=`, which checks it itself."""
    if request.endpoint == "board.static":
        return None
    if request.endpoint == "board.page" and "token" in request.args:
        return None
    return require_read_token()


@board.get("/")
def page() -> ResponseReturnValue:
    token = request.args.get("token")
    if token is not None:
        return _keep_token(token)
    response = Response(render_template("board.html"), mimetype="text/html")
    response.headers["Content-Security-Policy"] = PAGE_POLICY
    response.headers["Cache-Control"] = "no-store"
    return response


def _keep_token(token: str) -> ResponseReturnValue:
    """`/?token=`: a browser cannot put a header on a page load or an EventSource, so the token
    goes into an HttpOnly cookie, and the address bar loses it at once (303 to `/`)."""
    expected = services().settings.api_token
    if expected is not None and not hmac.compare_digest(token.encode(), expected.encode()):
        return error(401, "unauthorized", "wrong token")
    response = redirect("/", 303)
    if expected is not None:
        response.set_cookie(
            TOKEN_COOKIE,
            token,
            max_age=TOKEN_COOKIE_SECONDS,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.is_secure,
        )
    return response


@board.get("/board/state")
def state() -> tuple[Response, int]:
    store = services().store
    _, docs = store.docs.active_calls(None, None, 0, ACTIVE_SHOWN)
    return jsonify(
        {
            "server_ms": store.log.server_time_ms(),
            "active": [call_summary(doc) for doc in docs],
            "records": recent_records(store, RECORDS_SHOWN),
            "rejections": recent_rejections(store, REJECTIONS_SHOWN),
            "backlog": read_backlog(store),
            "forwarding": _forwarding(store),
        }
    ), 200


def _forwarding(store: Store) -> dict[str, int] | None:
    figures = read_forwarding(store)
    return None if figures is None else asdict(figures)


@board.get("/board/events")
def events() -> Response | tuple[Response, int]:
    feed = board_feed()
    if request.method == "HEAD":
        # No body is sent to a HEAD, so a stream would never notice its client leave.
        return _event_stream([]) if feed.streams < feed.max_streams else _too_many_streams(feed)
    stream = feed.open()
    if stream is None:
        return _too_many_streams(feed)
    client = request.environ.get("gunicorn.socket")
    lifetime = services().settings.board_stream_seconds
    if client is None:
        body = frames(stream, lifetime)
    else:
        client.settimeout(SEND_TIMEOUT_SECONDS)
        _give_up_on_a_vanished_peer(client)
        body = _shut_down_when_abandoned(
            frames(stream, lifetime, lambda: _has_left(client)), client
        )
    response = _event_stream(body)
    # Its place is given back when the response ends (the server closes it, even after a
    # failed write), never before: until then its thread is taken.
    response.call_on_close(lambda: feed.close(stream))
    return response


def _give_up_on_a_vanished_peer(client: socket.socket) -> None:
    """A peer that vanished without a word (a phone asleep, a NAT entry dropped) never
    acknowledges: let the kernel give the connection up after a while, not TCP's 15 minutes."""
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        with suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, UNACKED_LIMIT_MS)


def _has_left(client: socket.socket) -> bool:
    """Whether the client closed its end: a closed tab or a reload must give its place back at
    once, not at the second write after its close. Bytes it sent (a pipelined request) stay."""
    try:
        readable, _, _ = select.select([client], [], [], 0)
        return bool(readable) and client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _shut_down_when_abandoned(body: Iterator[str], client: socket.socket) -> Iterator[str]:
    """`body`, and when the server stops sending it early (a write failed or timed out), the
    connection shut down at once: gunicorn would otherwise linger up to 2 s on its worker's main
    thread, which accepts every connection, for a client that may never answer."""
    try:
        yield from body
    except GeneratorExit:
        with suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)
        raise


def _event_stream(body: Iterable[str]) -> Response:
    response = Response(body, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"  # a proxy must not hold the events back
    return response


def _too_many_streams(feed: BoardFeed) -> tuple[Response, int]:
    answer, status = error(
        503,
        "too_many_streams",
        f"this web process already serves {feed.max_streams} board streams "
        "(CALLSTATE_BOARD_STREAMS); retry later",
    )
    answer.headers["Retry-After"] = "30"
    return answer, status


def frames(
    stream: Stream, lifetime_seconds: float, left: Callable[[], bool] = lambda: False
) -> Iterator[str]:
    """The stream's events, a comment every `HEARTBEAT_SECONDS`, until it is dropped, its
    client has `left` (looked at every `WAIT_SLICE_SECONDS`) or `lifetime_seconds` pass: each
    stream holds one of the process's few threads, and the browser reconnects by itself."""
    yield f"retry: {RETRY_MS}\n\n"
    deadline = time.monotonic() + lifetime_seconds
    quiet_since = time.monotonic()
    while not stream.dropped.is_set() and not left():
        now = time.monotonic()
        if now >= deadline:
            return
        try:
            found = stream.take(timeout=min(WAIT_SLICE_SECONDS, deadline - now))
        except queue.Empty:
            if time.monotonic() - quiet_since < HEARTBEAT_SECONDS:
                continue
            found = ": keep-alive\n\n"
        if stream.dropped.is_set():
            return
        quiet_since = time.monotonic()
        yield found


def recent_records(store: Store, limit: int) -> list[Summary]:
    """The latest final records, newest first, one per call (its latest revision)."""
    found: dict[str, Summary] = {}
    for row in recordstream.newest(store.redis, store.keys, limit * 2):
        fields = row.fields
        summary = record_summary(json.loads(fields[b"record"]))
        call_id = summary["call_id"] or text(fields.get(b"call_id", b""))
        found.setdefault(call_id, summary)
    return list(found.values())[:limit]


def recent_rejections(store: Store, limit: int) -> list[Summary]:
    """The latest rejected events of every shard and refused deliveries, newest first."""
    pipe = store.redis.pipeline(transaction=False)
    for shard in range(store.settings.shards):
        pipe.lrange(store.keys.board_rejections(shard), 0, limit - 1)
    lists: list[list[bytes]] = pipe.execute()
    found: list[Summary] = [json.loads(raw) for rows in lists for raw in rows]
    seen = {item["log_id"] for item in found}
    found += [
        _refused_delivery(item)
        for item in store.quarantine.recent(limit)
        if item.get("log_id") is None or item["log_id"] not in seen
    ]
    found.sort(key=lambda item: item["ms"] or 0, reverse=True)
    return found[:limit]


def _refused_delivery(item: dict[str, Any]) -> Summary:
    """A quarantined delivery as a rejection: what was wrong, never the body."""
    return {
        "source": "delivery",
        "call_id": item.get("call_id"),
        "log_id": item.get("log_id"),
        "call_status": None,
        "reason": item.get("error"),
        "field": item.get("field"),
        "ms": item.get("received_ms"),
    }
