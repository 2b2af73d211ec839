"""One signed POST of a record revision to a receiver: Standard Webhooks headers, a bounded
wait, no redirect followed, at most a few KiB of the answer read."""

from __future__ import annotations

import hashlib
import socket
import threading
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import urllib3
from standardwebhooks import Webhook
from urllib3.connection import HTTPConnection, HTTPSConnection

# Enough of an answer to keep its connection for the next send; a longer one is cut off.
MAX_ANSWER_BYTES = 4096
USER_AGENT = "callstate-forwarder"


@dataclass(frozen=True)
class Destination:
    """A receiver: its URL, and a short id that names it in keys, jobs and logs (never the URL,
    which may carry a token)."""

    url: str

    @property
    def id(self) -> str:
        return hashlib.sha256(self.url.encode()).hexdigest()[:12]

    @property
    def target(self) -> str:
        """The request target: path and query."""
        parts = urlsplit(self.url)
        return f"{parts.path or '/'}{'?' + parts.query if parts.query else ''}"

    @property
    def place(self) -> str:
        """Scheme, host and port: what a log line may say of where it sent."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}".rstrip(":")


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    # What went wrong, for a log line: `HTTP 503` or an exception's class, never a body or URL.
    problem: str | None = None


def webhook_id(call_id: str, revision: int) -> str:
    """Stable per record revision, so a receiver de-duplicates what is delivered twice."""
    return f"{call_id}:{revision}"


class Watchdog:
    """Cuts a send's connection at its deadline: urllib3's timeouts bound each socket operation,
    not a whole answer that a receiver trickles a byte at a time (or in endless `100 Continue`
    lines), which would hold the forwarder, its shard lock and its job past their times."""

    current = threading.local()  # the watchdog of this thread's send, for its connection

    def __init__(self, seconds: float) -> None:
        self.connection: HTTPConnection | None = None
        self.timer = threading.Timer(seconds, self.cut)
        self.timer.daemon = True

    def __enter__(self) -> Watchdog:
        Watchdog.current.watchdog = self
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()
        Watchdog.current.watchdog = None

    @classmethod
    def watch(cls, connection: HTTPConnection) -> None:
        watchdog = getattr(cls.current, "watchdog", None)
        if watchdog is not None:
            watchdog.connection = connection

    def cut(self) -> None:
        sock = self.connection.sock if self.connection is not None else None
        if sock is not None:
            with suppress(OSError):  # the plain socket's shutdown: TLS state is the reader's
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class WatchedHTTPConnection(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        Watchdog.watch(self)
        super().request(*args, **kwargs)


class WatchedHTTPSConnection(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        Watchdog.watch(self)
        super().request(*args, **kwargs)


class Sender:
    """Signs and posts over one keep-alive pool per process, so a fast receiver costs little."""

    def __init__(self, secret: str, timeout_seconds: float) -> None:
        self.webhook = Webhook(secret)
        # A whole send: the connect timeout, then as long again for the request and answer.
        self.total_seconds = 2 * timeout_seconds
        self.pool = urllib3.PoolManager(
            retries=False,
            timeout=urllib3.Timeout(connect=timeout_seconds, read=timeout_seconds),
        )
        self.pools: dict[str, urllib3.HTTPConnectionPool] = {}

    def _pool_of(self, destination: Destination) -> urllib3.HTTPConnectionPool:
        pool = self.pools.get(destination.url)
        if pool is None:
            pool = self.pools[destination.url] = self.pool.connection_from_url(destination.url)
            https = isinstance(pool, urllib3.HTTPSConnectionPool)
            pool.ConnectionCls = WatchedHTTPSConnection if https else WatchedHTTPConnection
        return pool

    def headers(self, message_id: str, body: str) -> dict[str, str]:
        now = datetime.now(UTC)
        return {
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.webhook.sign(message_id, now, body),
        }

    def send(self, destination: Destination, message_id: str, body: str) -> Outcome:
        """POST `body`, signed; a 2xx is delivered, anything else (another status, a redirect,
        a timeout, a refused or dropped connection) is not."""
        with Watchdog(self.total_seconds):
            return self._send(destination, message_id, body)

    def _send(self, destination: Destination, message_id: str, body: str) -> Outcome:
        try:
            # The receiver's own pool, found once: PoolManager.request would parse the URL and
            # look the pool up on every send.
            answer = self._pool_of(destination).urlopen(
                "POST",
                destination.target,
                body=body.encode(),
                headers=self.headers(message_id, body),
                redirect=False,
                preload_content=False,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return Outcome(False, type(exc).__name__)
        try:
            _read_a_little(answer)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return Outcome(False, type(exc).__name__)
        if 200 <= answer.status < 300:
            return Outcome(True)
        return Outcome(False, f"HTTP {answer.status}")


def _read_a_little(answer: urllib3.BaseHTTPResponse) -> None:
    """Read up to MAX_ANSWER_BYTES; keep the connection if that was all, else close it."""
    answer.read(MAX_ANSWER_BYTES, decode_content=False)
    if answer.read(1, decode_content=False):
        answer.close()  # the rest is not read: this connection cannot carry the next request
    answer.release_conn()
