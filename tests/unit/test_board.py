"""The live call board on fakeredis: what a commit publishes, the feed's fan-out, the page's
token cookie, the stream limit, and the first picture."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from socket import SHUT_RDWR
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_schema_validator import OAS31Validator
from redis import Redis
from redis.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from werkzeug.test import TestResponse

from callstate import board as board_module
from callstate import boardview
from callstate.apidoc import openapi_document
from callstate.boardfeed import DOWN, RESET, BoardFeed, Stream
from callstate.calls import Doc
from callstate.config import Settings
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.rebuild import rebuild
from callstate.store import Store
from callstate.web import create_app
from tests.factories import body, ended, event, to_agent

JSON = {"Content-Type": "application/json"}


def same_shard_ids(store: Store, count: int) -> list[str]:
    """Call ids that share a shard, so one drain batch holds all their events."""
    found: list[str] = []
    wanted = store.keys.shard_of("board-0")
    n = 0
    while len(found) < count:
        call_id = f"board-{n}"
        if store.keys.shard_of(call_id) == wanted:
            found.append(call_id)
        n += 1
    return found


def log_events(store: Store, *payloads: dict[str, Any]) -> int:
    shards = {store.log.append_event(p["call_id"], body(p))[1] for p in payloads}
    assert len(shards) == 1
    return shards.pop()


def next_published(pubsub: PubSub, timeout: float = 2.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            data: bytes = message["data"]
            return data
    raise AssertionError("nothing published")


def next_message(pubsub: PubSub, timeout: float = 2.0) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(next_published(pubsub, timeout))
    return loaded


@pytest.fixture
def board_channel(redis: Redis, store: Store) -> Iterator[PubSub]:
    pubsub = redis.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(*(store.keys.board_channel(s) for s in range(store.settings.shards)))
    yield pubsub
    pubsub.close()


def test_a_commit_publishes_its_calls_records_and_rejections_on_its_shards_channel(
    store: Store, drainer: Drainer, board_channel: PubSub
) -> None:
    live, done = same_shard_ids(store, 2)
    shard = log_events(
        store,
        event(live, "ringing", 2_000),
        event(live, "created", 1_000),  # older than the ringing: rejected out_of_order
        event(done, "ringing", 1_000),
        ended(done, 5_000, "486 Busy Here", 0),
    )
    drainer.drain(shard)
    message = next_message(board_channel)
    assert message["shard"] == shard
    calls = {call["call_id"]: call for call in message["calls"]}
    assert calls[live] == {
        "call_id": live,
        "status": "ringing",
        "active": True,
        "caller": "84899199866",
        "callee": "84909985668",
        "agent": "huydn",
        "since_ms": 2_000,
        "version": 2,
    }
    assert calls[done]["status"] == "ended" and calls[done]["active"] is False
    [record] = message["records"]
    assert record["call_id"] == done
    assert record["disposition"] == "busy"
    assert record["sip_code"] == 486
    assert (record["duration"], record["answer_duration"]) == (9, 0)
    assert (record["ended_ms"], record["revision"], record["agent"]) == (5_000, 1, "huydn")
    [rejection] = message["rejections"]
    created_log_id = store.docs.get_doc(live)["journal"][1]["log_id"]  # type: ignore[index]
    assert rejection == {
        "source": "event",
        "call_id": live,
        "log_id": created_log_id,
        "call_status": "created",
        "reason": "out_of_order",
        "ms": int(created_log_id.split("-")[0]),
    }
    kept = store.redis.lrange(store.keys.board_rejections(shard), 0, -1)
    assert [json.loads(raw) for raw in kept] == [rejection]


def test_only_the_batchs_own_rejections_are_published(
    store: Store, drainer: Drainer, board_channel: PubSub
) -> None:
    [call_id] = same_shard_ids(store, 1)
    shard = log_events(store, event(call_id, "answered", 2_000), event(call_id, "ringing", 1_000))
    drainer.drain(shard)
    assert len(next_message(board_channel)["rejections"]) == 1
    log_events(store, ended(call_id, 3_000, "USER_END_CALL", 10))
    drainer.drain(shard)
    later = next_message(board_channel)
    assert later["rejections"] == []
    assert [record["disposition"] for record in later["records"]] == ["answered"]
    assert store.redis.llen(store.keys.board_rejections(shard)) == 1


def test_records_of_calls_with_a_common_64_character_prefix_keep_their_whole_ids(
    store: Store, drainer: Drainer, board_channel: PubSub
) -> None:
    prefix = "p" * 64
    for call_id in (f"{prefix}-call-1", f"{prefix}-call-2"):
        ringing, end = event(call_id, "ringing", 1_000), ended(call_id, 2_000, "USER_END_CALL", 5)
        drainer.drain(log_events(store, ringing, end))
        [record] = next_message(board_channel)["records"]
        assert record["call_id"] == call_id


def test_a_batch_too_large_for_one_message_publishes_a_reset_hint_and_keeps_its_rejections(
    store: Store, drainer: Drainer, board_channel: PubSub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boardview, "MAX_MESSAGE_BYTES", 1_000)
    calls = same_shard_ids(store, 6)  # one batch (7 events), ~1.5 KB of message
    shard = log_events(
        store,
        *(event(call_id, "ringing", 1_000) for call_id in calls),
        event(calls[0], "created", 500),  # out of order: rejected
    )
    drainer.drain(shard)
    assert next_published(board_channel) == boardview.RESET_HINT.encode()
    assert store.redis.llen(store.keys.board_rejections(shard)) == 1
    log_events(store, ended(calls[0], 3_000, "USER_END_CALL", 0))
    drainer.drain(shard)
    assert [record["call_id"] for record in next_message(board_channel)["records"]] == [calls[0]]


def test_the_agent_of_a_call_center_call_is_the_agent_ringing_now(
    deliver: Callable[..., Doc], board_channel: PubSub
) -> None:
    inbound = {"callCreatedReason": "EXTERNAL_CALL_IN", "request_from_user_id": None}
    deliver(
        event("cc-1", "created", 1_000, **inbound),
        event("cc-1", "ringing", 1_001, to=to_agent("agent-1"), **inbound),
        event("cc-1", "agentEnded", 1_002, to=to_agent("agent-1"), **inbound),
        event("cc-1", "ringing", 1_003, to=to_agent("agent-2"), **inbound),
    )
    [call] = next_message(board_channel)["calls"]
    assert (call["status"], call["agent"], call["since_ms"]) == ("ringing", "agent-2", 1_003)


def test_values_a_sender_controls_are_cut_and_typed(
    deliver: Callable[..., Doc], board_channel: PubSub
) -> None:
    deliver(event("long-1", "ringing", 1_000, request_from_user_id="u" * 500, to={"number": 7}))
    [call] = next_message(board_channel)["calls"]
    assert call["agent"] == "u" * 64
    assert call["callee"] is None


# --- the feed -------------------------------------------------------------------------------


def frames_until(stream: Stream, wanted: int, timeout: float = 3.0) -> list[str]:
    """Take `wanted` frames off a stream, polling with a deadline."""
    taken: list[str] = []
    deadline = time.monotonic() + timeout
    while len(taken) < wanted:
        try:
            taken.append(stream.take(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError(f"got {taken}, wanted {wanted} frames") from None
    return taken


def feed_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "board-feed")


def wait_for(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


@pytest.fixture
def feed(store: Store) -> Iterator[BoardFeed]:
    feed = BoardFeed(store, max_streams=3, queue_frames=3, backlog=lambda _: [])
    yield feed
    for stream in list(feed._streams):
        feed.close(stream)
    wait_for(lambda: feed_threads() == 0)


def test_the_feed_fans_out_to_every_stream_and_drops_a_slow_one(
    feed: BoardFeed, redis: Redis, store: Store
) -> None:
    fast, slow = feed.open(), feed.open()
    assert fast is not None and slow is not None
    assert frames_until(fast, 2) == [
        'event: backlog\ndata: {"backlog": []}\n\n',
        RESET,
    ]
    channel = store.keys.board_channel(1)
    for n in range(3):
        redis.publish(channel, json.dumps({"n": n}))
        assert frames_until(fast, 1) == [f'event: change\ndata: {{"n": {n}}}\n\n']
    # The slow one took nothing: its 3 frames filled up at the second change, the third
    # dropped it, and nobody waited for it.
    wait_for(slow.dropped.is_set)
    redis.publish(channel, json.dumps({"n": 3}))
    assert frames_until(fast, 1) == ['event: change\ndata: {"n": 3}\n\n']


def test_a_dropped_stream_keeps_its_place_until_its_response_ends(feed: BoardFeed) -> None:
    """Its thread may be blocked writing to a client that does not read: the limit counts it."""
    streams = [feed.open() for _ in range(feed.max_streams)]
    for n in range(feed.queue_frames + 3):  # nobody takes a frame: every stream is dropped
        feed.fan_out(f"event: change\ndata: {n}\n\n")
    assert all(stream is not None and stream.dropped.is_set() for stream in streams)
    assert feed.streams == feed.max_streams
    assert feed.open() is None
    first = streams[0]
    assert first is not None
    feed.close(first)
    assert feed.open() is not None


def test_a_stream_is_dropped_when_its_frames_exceed_its_bytes() -> None:
    stream = Stream(256, max_bytes=100)
    assert stream.offer("a" * 60)
    assert not stream.offer("b" * 60)
    assert stream.take(timeout=1) == "a" * 60
    assert stream.offer("b" * 60) and stream.offer("c" * 40)
    assert not stream.offer("d")


def test_reset_hints_reload_boards_at_most_once_a_period_and_never_lose_the_last(
    feed: BoardFeed, redis: Redis, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("callstate.boardfeed.RESET_EVERY_SECONDS", 0.5)
    stream = feed.open()
    assert stream is not None and RESET in frames_until(stream, 2)
    channel = store.keys.board_channel(0)
    for _ in range(3):
        redis.publish(channel, boardview.RESET_HINT)
    redis.publish(channel, json.dumps({"n": 1}))
    first = frames_until(stream, 1)
    first_at = time.monotonic()
    rest = frames_until(stream, 2)
    assert first + rest == [RESET, 'event: change\ndata: {"n": 1}\n\n', RESET]
    assert time.monotonic() - first_at >= 0.4
    with pytest.raises(queue.Empty):
        stream.take(timeout=0.7)  # three hints, two reloads


def test_one_subscriber_thread_starts_with_the_first_stream_and_stops_with_the_last(
    feed: BoardFeed,
) -> None:
    assert feed_threads() == 0
    first, second = feed.open(), feed.open()
    assert first is not None and second is not None
    assert RESET in frames_until(first, 2)
    assert feed_threads() == 1
    late = feed.open()
    assert late is not None
    assert frames_until(late, 1) == [RESET]  # the feed is live already: reload at once
    for stream in (first, second, late):
        feed.close(stream)
    wait_for(lambda: feed_threads() == 0)
    again = feed.open()
    assert again is not None
    assert RESET in frames_until(again, 2)


def test_the_feed_tells_boards_to_reload_after_redis_came_back(
    feed: BoardFeed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("callstate.boardfeed.RECONNECT_SECONDS", 0.01)
    failed = threading.Event()

    def backlog_failing_once_live(_: Store) -> list[dict[str, Any]]:
        if feed._live and not failed.is_set():
            failed.set()
            raise RedisConnectionError("gone")
        return []

    feed.backlog, feed.backlog_every = backlog_failing_once_live, 0.0
    stream = feed.open()
    assert stream is not None
    taken = frames_until(stream, 5)
    assert failed.is_set()
    assert taken.count(RESET) == 2  # once subscribed, again once subscribed anew
    assert taken.index(RESET) < taken.index(DOWN) < len(taken) - 1 - taken[::-1].index(RESET)
    assert feed_threads() == 1


def test_stopping_ends_every_stream_at_once_and_opens_no_more(feed: BoardFeed) -> None:
    stream = feed.open()
    assert stream is not None
    sender = board_module.frames(stream, lifetime_seconds=60)
    assert next(sender).startswith("retry:")
    frames_until(stream, 2)  # the backlog and the reset: the queue is empty now
    ended_at: list[float] = []

    def send_all() -> None:
        list(sender)
        ended_at.append(time.monotonic())

    sending = threading.Thread(target=send_all)
    sending.start()
    feed.stop()
    sending.join(timeout=2)
    assert ended_at, "the stream did not end"
    assert feed.open() is None


def test_sigterm_stops_the_feed_then_reaches_the_servers_own_handler(
    feed: BoardFeed,
) -> None:
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _: received.append(signum))
    try:
        stream = feed.open()
        assert stream is not None
        feed.stop_on_sigterm()
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: bool(received))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM]
    assert stream.dropped.is_set() and feed.open() is None


# --- the endpoints ----------------------------------------------------------------------------


@pytest.fixture
def make_app(settings: Settings, redis: Redis) -> Callable[..., Flask]:
    def build(**changes: Any) -> Flask:
        return create_app(dataclasses.replace(settings, **changes), redis)

    return build


def test_the_page_stores_the_token_in_a_cookie_that_every_read_accepts(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(api_token="tok").test_client()
    refused = client.get("/")
    assert refused.status_code == 401 and refused.get_json()["error"] == "unauthorized"
    wrong = client.get("/?token=nope")
    assert wrong.status_code == 401 and wrong.get_json()["error"] == "unauthorized"
    assert "Set-Cookie" not in wrong.headers
    stored = client.get("/?token=tok")
    assert stored.status_code == 303 and stored.headers["Location"] == "/"
    cookie = stored.headers["Set-Cookie"]
    for attribute in ("callstate_token=tok", "HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in cookie
    for path in ("/", "/board/state", "/calls?active=true"):
        assert client.get(path).status_code == 200, path
    client.set_cookie("callstate_token", "forged")
    assert client.get("/board/state").status_code == 401
    stranger = make_app(api_token="tok").test_client()
    bearer = {"Authorization": "Bearer tok"}
    assert stranger.get("/board/state", headers=bearer).status_code == 200


def test_the_page_is_html_with_only_its_own_scripts(make_app: Callable[..., Flask]) -> None:
    client = make_app(api_token="tok").test_client()
    client.get("/?token=tok")
    page = client.get("/")
    assert page.mimetype == "text/html"
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
    html = page.get_data(as_text=True)
    assert "/board/static/board.js" in html and "/board/static/board.css" in html
    assert "<script>" not in html  # nothing inline: the policy would block it
    stranger = make_app(api_token="tok").test_client()
    script = stranger.get("/board/static/board.js")  # no data in it: no token needed
    assert script.status_code == 200 and "EventSource" in script.get_data(as_text=True)
    assert "innerHTML" not in script.get_data(as_text=True)
    script.close()


def open_stream(client: FlaskClient) -> TestResponse:
    return client.get("/board/events", buffered=False)


def test_streams_beyond_the_limit_get_503_and_a_closed_one_frees_its_place(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(board_streams=2)
    client = app.test_client()
    first, second = open_stream(client), open_stream(client)
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.mimetype == "text/event-stream"
    refused = open_stream(client)
    assert refused.status_code == 503
    assert refused.get_json()["error"] == "too_many_streams"
    assert refused.headers["Retry-After"]
    first.close()
    third = open_stream(client)
    assert third.status_code == 200
    for response in (second, third):
        response.close()
    assert app.extensions["callstate.board"].streams == 0


class RecordingSocket(socket.socket):
    """gunicorn's socket (`gunicorn.socket` in the WSGI environ): a real connected one, whose
    other end is `peer`, recording what a stream does to it."""

    def __init__(self) -> None:
        mine, self.peer = socket.socketpair()
        super().__init__(mine.family, mine.type, fileno=mine.detach())
        self.timeouts: list[float | None] = []
        self.shut_down: list[int] = []

    def settimeout(self, timeout: float | None) -> None:
        self.timeouts.append(timeout)
        super().settimeout(timeout)

    def shutdown(self, how: int) -> None:
        self.shut_down.append(how)
        super().shutdown(how)


def test_a_stream_bounds_how_long_a_write_may_block_and_shuts_an_abandoned_connection_down(
    make_app: Callable[..., Flask],
) -> None:
    gunicorn_socket = RecordingSocket()
    client = make_app().test_client()
    stream = client.get(
        "/board/events", buffered=False, environ_overrides={"gunicorn.socket": gunicorn_socket}
    )
    assert stream.status_code == 200
    assert gunicorn_socket.timeouts == [board_module.SEND_TIMEOUT_SECONDS]
    assert next(iter(stream.response)) == f"retry: {board_module.RETRY_MS}\n\n".encode()
    assert gunicorn_socket.shut_down == []
    stream.close()  # what the server does when a write fails: it stops early
    assert gunicorn_socket.shut_down == [SHUT_RDWR]


def test_a_stream_whose_client_closed_its_end_ends_and_gives_its_place_back_at_once(
    make_app: Callable[..., Flask],
) -> None:
    """A closed tab or a reload: no write is needed to notice, so the place comes back within
    a wait slice, not at the second heartbeat after the close."""
    app = make_app(board_streams=1)
    gunicorn_socket = RecordingSocket()
    stream = app.test_client().get(
        "/board/events", buffered=False, environ_overrides={"gunicorn.socket": gunicorn_socket}
    )
    frames = iter(stream.response)
    assert next(frames) == f"retry: {board_module.RETRY_MS}\n\n".encode()
    gunicorn_socket.peer.close()
    started = time.monotonic()
    assert list(frames) == []
    assert time.monotonic() - started < 2 * board_module.WAIT_SLICE_SECONDS + 1
    stream.close()
    assert app.extensions["callstate.board"].streams == 0
    gunicorn_socket.close()


def test_a_head_takes_no_stream_place(make_app: Callable[..., Flask]) -> None:
    """Nothing is written to a HEAD, so a stream held by one would never notice its client go."""
    app = make_app(board_streams=1)
    client = app.test_client()
    head = client.head("/board/events")
    assert (head.status_code, head.mimetype, head.data) == (200, "text/event-stream", b"")
    assert app.extensions["callstate.board"].streams == 0
    held = open_stream(client)
    assert client.head("/board/events").status_code == 503
    held.close()


def test_the_app_leaves_sigterm_alone_and_the_worker_hook_wraps_it(
    make_app: Callable[..., Flask],
) -> None:
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _: received.append(signum))
    try:
        before = signal.getsignal(signal.SIGTERM)
        app = make_app()
        assert signal.getsignal(signal.SIGTERM) is before
        stream = open_stream(app.test_client())
        board_module.stop_streams_on_sigterm(object())  # another WSGI app: nothing to stop
        assert signal.getsignal(signal.SIGTERM) is before
        board_module.stop_streams_on_sigterm(app)
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: bool(received))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM]
    assert stream.get_data(as_text=True) == f"retry: {board_module.RETRY_MS}\n\n"
    stream.close()


def documented_answer(path: str, status: int) -> dict[str, Any]:
    answer: dict[str, Any] = openapi_document()["paths"][path]["get"]["responses"][str(status)]
    return answer


def test_a_full_stream_table_answers_as_the_api_document_says(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(board_streams=1).test_client()
    held = open_stream(client)
    refused = open_stream(client)
    held.close()
    answer = documented_answer("/board/events", refused.status_code)
    assert all(name in refused.headers for name in answer["headers"])
    schema = answer["content"]["application/json"]["schema"]
    OAS31Validator({**schema, "components": openapi_document()["components"]}).validate(
        refused.get_json()
    )


@pytest.mark.parametrize(
    ("headers", "status"),
    [({"Range": "bytes=0-9"}, 206), ({"Range": "bytes=999999-"}, 416), ("etag", 304)],
)
def test_the_pages_files_answer_ranges_and_etags_as_the_api_document_says(
    make_app: Callable[..., Flask], headers: dict[str, str] | str, status: int
) -> None:
    client = make_app().test_client()
    if headers == "etag":
        headers = {"If-None-Match": client.get("/board/static/board.js").headers["ETag"]}
    answer = client.get("/board/static/board.js", headers=headers)
    assert answer.status_code == status
    documented = documented_answer("/board/static/{filename}", status)
    assert all(name in answer.headers for name in documented.get("headers", {}))


def test_a_stream_says_when_to_retry_beats_while_idle_and_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(board_module, "HEARTBEAT_SECONDS", 0.05)
    stream = Stream(4)
    stream.offer("event: change\ndata: {}\n\n")
    started = time.monotonic()
    sent = list(board_module.frames(stream, lifetime_seconds=0.3))
    assert sent[0] == f"retry: {board_module.RETRY_MS}\n\n"
    assert sent[1] == "event: change\ndata: {}\n\n"
    assert ": keep-alive\n\n" in sent[2:]
    assert 0.3 <= time.monotonic() - started < 2


def test_a_dropped_stream_ends() -> None:
    stream = Stream(4)
    stream.dropped.set()
    assert list(board_module.frames(stream, lifetime_seconds=60)) == [
        f"retry: {board_module.RETRY_MS}\n\n"
    ]


def test_the_state_holds_active_calls_latest_records_rejections_and_backlog(
    make_app: Callable[..., Flask], store: Store, drainer: Drainer
) -> None:
    client = make_app().test_client()
    live, done = same_shard_ids(store, 2)
    shard = log_events(
        store,
        event(live, "ringing", 2_000),
        event(live, "created", 1_000),
        event(done, "answered", 1_000),
        ended(done, 3_000, "USER_END_CALL", 20),
        {"call_id": done, "recording_url": "https://r/1"},  # a second revision
    )
    drainer.drain(shard)
    refused = client.post("/webhooks/stringee", data=b"{", headers=JSON)
    assert refused.status_code == 400
    state = client.get("/board/state").get_json()
    assert isinstance(state["server_ms"], int)
    assert [(c["call_id"], c["status"]) for c in state["active"]] == [(live, "ringing")]
    [record] = state["records"]
    assert (record["call_id"], record["revision"], record["disposition"]) == (done, 2, "answered")
    assert [(r["source"], r["reason"]) for r in state["rejections"]] == [
        ("delivery", "invalid_json"),
        ("event", "out_of_order"),
    ]
    assert [b["shard"] for b in state["backlog"]] == list(range(store.settings.shards))
    assert all(b["entries"] == 0 for b in state["backlog"])


def test_board_settings_come_from_the_environment() -> None:
    env = {"CALLSTATE_BOARD_STREAMS": "5", "CALLSTATE_BOARD_STREAM_SECONDS": "60"}
    settings = Settings.from_env(env)
    assert (settings.board_streams, settings.board_stream_seconds) == (5, 60)
    assert Settings.from_env({}).board_streams == 2
    with pytest.raises(ValueError, match="CALLSTATE_BOARD_STREAMS"):
        Settings.from_env({"CALLSTATE_BOARD_STREAMS": "0"})


def test_a_rebuild_tells_open_boards_to_reload(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    """What a rebuild rewrites was never published: a board must load its picture again."""
    store.log.append_event("rb-1", body(event("rb-1", "ringing", 100)))
    drainer.drain(store.keys.shard_of("rb-1"))
    listener = store.redis.pubsub()  # type: ignore[no-untyped-call]
    channels = [store.keys.board_channel(s) for s in range(store.settings.shards)]
    listener.subscribe(*channels)
    rebuild(store, machine)
    hints: dict[str, bytes] = {}
    while (message := listener.get_message(timeout=0.1)) is not None:
        if message["type"] == "message":
            hints[message["channel"].decode()] = message["data"]
    listener.close()
    assert hints == {channel: boardview.RESET_HINT.encode() for channel in channels}
