"""Board streams under real gunicorn (1 process, 4 threads): a client that never reads holds a
thread at most `SEND_TIMEOUT_SECONDS` past its last accepted write and never more places than
`CALLSTATE_BOARD_STREAMS`; SIGTERM ends open streams at once, with `--preload` too."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlparse

import pytest
import requests

from callstate.board import SEND_TIMEOUT_SECONDS
from tests.factories import event
from tests.integration.stack import BIN, Stack, free_port, wait_until

MakeStack = Callable[..., Stack]
FLOOD_MESSAGE = json.dumps(
    {"shard": 0, "calls": [], "records": [], "rejections": [], "pad": "x" * 60_000}
)


def open_unread_stream(url: str) -> tuple[socket.socket, bytes]:
    """`GET /board/events` from a client that reads nothing (a tiny receive window); the status
    line is peeked at, not consumed."""
    parsed = urlparse(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect((parsed.hostname or "", parsed.port or 0))
    sock.sendall(b"GET /board/events HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(5)
    head = sock.recv(16, socket.MSG_PEEK)
    return sock, head


def flood_until_dropped(stack: Stack, streams: int) -> None:
    """Publish large board messages until the web process has dropped `streams` streams as too
    far behind: their senders are blocked writing to a client that does not read."""
    redis = stack.redis.client()
    log = stack.workdir / "web.log"

    def dropped() -> bool:
        redis.publish(stack.keys.board_channel(0), FLOOD_MESSAGE)
        return log.read_text(errors="replace").count("board stream dropped") >= streams

    wait_until(dropped, 20, f"{streams} board streams dropped")


def a_stream_place_is_free(url: str) -> bool:
    """A HEAD answers as a GET would, without taking a place."""
    return requests.head(f"{url}/board/events", timeout=5).status_code == 200


def test_unread_streams_never_exceed_the_limit_and_free_their_threads_after_the_send_timeout(
    make_stack: MakeStack,
) -> None:
    stack = make_stack(CALLSTATE_BOARD_STREAMS="2")
    stack.start_web(1)
    held = [open_unread_stream(stack.web_url) for _ in range(2)]
    assert all(b" 200 " in head for _, head in held)
    flood_until_dropped(stack, 2)
    blocked_at = time.monotonic()
    # Both dropped, both threads still blocked in a write: no place for a third stream.
    assert [open_unread_stream(stack.web_url)[1][9:12] for _ in range(2)] == [b"503", b"503"]
    assert stack.post(event("webhook-1", "ringing", 1)).status_code == 200
    wait_until(lambda: a_stream_place_is_free(stack.web_url), SEND_TIMEOUT_SECONDS + 2, "a place")
    assert time.monotonic() - blocked_at < SEND_TIMEOUT_SECONDS + 2
    for sock, _ in held:
        sock.close()
    log = (stack.workdir / "web.log").read_text(errors="replace")
    assert "Socket error processing request" not in log, "an expected timeout is no ERROR"


def test_a_client_that_closes_its_stream_gives_its_place_back_at_once(
    make_stack: MakeStack,
) -> None:
    """A reload or a closed tab: on a quiet board no write would notice it for two heartbeats."""
    stack = make_stack(CALLSTATE_BOARD_STREAMS="1")
    stack.start_web(1)
    sock, head = open_unread_stream(stack.web_url)
    assert b" 200 " in head
    assert not a_stream_place_is_free(stack.web_url)
    sock.close()
    closed_at = time.monotonic()
    wait_until(lambda: a_stream_place_is_free(stack.web_url), 5, "the place to come back")
    assert time.monotonic() - closed_at < 3


def test_unread_streams_on_every_thread_hold_the_webhook_no_longer_than_the_send_timeout(
    make_stack: MakeStack,
) -> None:
    stack = make_stack(CALLSTATE_BOARD_STREAMS="4")
    stack.start_web(1)
    held = [open_unread_stream(stack.web_url) for _ in range(4)]
    assert all(b" 200 " in head for _, head in held)
    flood_until_dropped(stack, 4)  # all 4 threads are blocked writing
    started = time.monotonic()
    answer = requests.post(
        f"{stack.web_url}/webhooks/stringee",
        json=event("webhook-2", "ringing", 1),
        timeout=SEND_TIMEOUT_SECONDS + 2,
    )
    assert answer.status_code == 200
    assert time.monotonic() - started < SEND_TIMEOUT_SECONDS + 2
    for sock, _ in held:
        sock.close()


@pytest.mark.parametrize("preload", [False, True], ids=["plain", "preload"])
def test_sigterm_ends_an_open_board_stream_at_once(make_stack: MakeStack, preload: bool) -> None:
    stack = make_stack()
    port = free_port()
    stack.web_url = f"http://127.0.0.1:{port}"
    argv = [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--threads", "4"]
    web = stack.spawn("web", [*argv, *(["--preload"] if preload else []), "app:app"])
    wait_until(stack.web_answers, 30, "gunicorn to answer")
    seen: list[str] = []

    def read() -> None:
        try:
            with requests.get(f"{stack.web_url}/board/events", stream=True, timeout=60) as r:
                seen.extend(r.iter_lines(decode_unicode=True))
        except requests.RequestException:
            pass

    threading.Thread(target=read, daemon=True).start()
    wait_until(lambda: "event: reset" in seen, 10, "the stream")
    started = time.monotonic()
    os.kill(web.pid, signal.SIGTERM)
    wait_until(lambda: web.poll() is not None, 10, "gunicorn to stop (graceful timeout: 30 s)")
    assert time.monotonic() - started < 10
