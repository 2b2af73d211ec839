"""The live board's feed: one subscriber thread per web process fans what the drainers commit
out to the connected Server-Sent Events streams, through bounded queues."""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from types import FrameType
from typing import Any

from redis.exceptions import RedisError

from callstate.boardview import RESET_HINT
from callstate.figures import shard_backlogs
from callstate.store import Store

log = logging.getLogger(__name__)

# Frames, and bytes of them, a stream may have waiting before its client counts as too slow and
# is dropped.
QUEUE_FRAMES = 256
QUEUE_BYTES = 1024 * 1024
BACKLOG_EVERY_SECONDS = 2.0
POLL_SECONDS = 0.5
RECONNECT_SECONDS = 1.0
# A batch too large to publish comes as `RESET_HINT`: boards reload their picture, at most once
# per this many seconds, so a burst of large batches does not become a burst of reloads.
RESET_EVERY_SECONDS = 1.0


def read_backlog(store: Store) -> list[dict[str, Any]]:
    """Each shard's backlog as the board shows it."""
    return [asdict(backlog) for backlog in shard_backlogs(store)]


def frame(event: str, data: str) -> str:
    """One Server-Sent Event; `data` is one line of JSON."""
    return f"event: {event}\ndata: {data}\n\n"


# `reset`: listening from now on, load the picture; `down`: not listening, the picture is stale.
RESET = frame("reset", "{}")
DOWN = frame("down", "{}")


class Stream:
    """One client's stream: frames waiting to be sent, and whether the feed gave up on it."""

    def __init__(self, size: int, max_bytes: int = QUEUE_BYTES) -> None:
        self.frames: queue.Queue[str] = queue.Queue(size)
        self.max_bytes = max_bytes
        self.dropped = threading.Event()
        self._bytes = 0
        self._lock = threading.Lock()

    def end(self) -> None:
        """Make the stream's sender stop at once, even while it waits for a frame."""
        self.dropped.set()
        self.offer("")

    def offer(self, text: str) -> bool:
        """Queue a frame without waiting; False when the client is too far behind."""
        with self._lock:
            if self._bytes + len(text) > self.max_bytes:
                return False
            try:
                self.frames.put_nowait(text)
            except queue.Full:
                return False
            self._bytes += len(text)
        return True

    def take(self, timeout: float) -> str:
        """The next frame, waiting up to `timeout`; raises `queue.Empty` when none came."""
        text = self.frames.get(timeout=timeout)
        with self._lock:
            self._bytes -= len(text)
        return text


class BoardFeed:
    """Per-process fan-out of the shards' board channels to at most `max_streams` streams.

    The subscriber thread starts with the first stream and stops with the last. Each time its
    subscription is (re)established it sends `reset`, on which a board reloads its picture:
    what was published while no subscription was listening is lost to pub/sub (it sends
    `down` when it loses Redis). A stream whose queue is full is dropped rather than waited
    for: its client reconnects and reloads. A stream keeps its place until `close`, when its
    response has really ended: a dropped stream's thread may still be blocked writing to it.
    """

    def __init__(
        self,
        store: Store,
        max_streams: int,
        queue_frames: int = QUEUE_FRAMES,
        queue_bytes: int = QUEUE_BYTES,
        backlog_every: float = BACKLOG_EVERY_SECONDS,
        backlog: Callable[[Store], list[dict[str, Any]]] = read_backlog,
    ) -> None:
        self.store = store
        self.max_streams = max_streams
        self.queue_frames = queue_frames
        self.queue_bytes = queue_bytes
        self.backlog_every = backlog_every
        self.backlog = backlog
        self.channels = [store.keys.board_channel(s) for s in range(store.settings.shards)]
        self._lock = threading.Lock()
        self._streams: set[Stream] = set()
        self._thread: threading.Thread | None = None
        self._live = False
        self._stopping = False
        self._reset_wanted = False

    def open(self) -> Stream | None:
        """A new stream, or None when this process already serves `max_streams`."""
        with self._lock:
            if self._stopping or len(self._streams) >= self.max_streams:
                return None
            stream = Stream(self.queue_frames, self.queue_bytes)
            self._streams.add(stream)
            if self._live:
                stream.offer(RESET)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="board-feed", daemon=True)
                self._thread.start()
            return stream

    def close(self, stream: Stream) -> None:
        """Give the stream's place back: its response has ended, its thread is free."""
        with self._lock:
            self._streams.discard(stream)

    def stop(self) -> None:
        """End every stream and open no more: the server is stopping."""
        with self._lock:
            self._stopping = True
            streams = list(self._streams)
        for stream in streams:
            stream.end()

    def stop_on_sigterm(self) -> None:
        """Stop before the server's own SIGTERM handler runs, when it has one: gunicorn lets
        running requests finish for up to its graceful timeout, and a stream would keep it
        waiting that long. Call it in the worker's main thread once the server has set its
        handler: gunicorn's `post_worker_init` hook (gunicorn.conf.py)."""
        server_handler = signal.getsignal(signal.SIGTERM)
        if not callable(server_handler):
            return

        def stop_then_hand_over(signum: int, frame: FrameType | None) -> None:
            self.stop()
            server_handler(signum, frame)

        signal.signal(signal.SIGTERM, stop_then_hand_over)

    @property
    def streams(self) -> int:
        with self._lock:
            return len(self._streams)

    def fan_out(self, text: str) -> None:
        """Queue a frame on every live stream; a stream that cannot take it is dropped (it keeps
        its place until its response ends)."""
        with self._lock:
            streams = [stream for stream in self._streams if not stream.dropped.is_set()]
        for stream in streams:
            if not stream.offer(text):
                stream.end()
                log.info("board stream dropped: its client is too far behind")

    def _wanted(self) -> bool:
        """Whether the thread should go on; when not, it is forgotten under the same lock that
        `open` starts a new one under, so no stream is ever left without a subscriber."""
        with self._lock:
            if self._streams:
                return True
            self._thread, self._live = None, False
            return False

    def _run(self) -> None:
        while True:
            try:
                self._listen()
                return  # no stream left, and the thread already forgotten
            except RedisError as exc:
                log.warning("board feed lost Redis (%s); subscribing again", type(exc).__name__)
            except Exception:  # a bug must not leave every board without updates for good
                log.exception("board feed failed; subscribing again")
            with self._lock:
                self._live = False
            self.fan_out(DOWN)
            time.sleep(RECONNECT_SECONDS)
            if not self._wanted():
                return

    def _listen(self) -> None:
        pubsub = self.store.redis.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(*self.channels)
            sent_backlog: list[dict[str, Any]] | None = None
            next_backlog = 0.0
            last_reset = 0.0
            while self._wanted():
                self._handle(pubsub.get_message(timeout=POLL_SECONDS))
                if self._reset_wanted and time.monotonic() >= last_reset + RESET_EVERY_SECONDS:
                    self._reset_wanted, last_reset = False, time.monotonic()
                    self.fan_out(RESET)
                if time.monotonic() >= next_backlog:
                    next_backlog = time.monotonic() + self.backlog_every
                    backlog = self.backlog(self.store)
                    if backlog != sent_backlog:
                        self.fan_out(frame("backlog", json.dumps({"backlog": backlog})))
                        sent_backlog = backlog
        finally:
            pubsub.close()

    def _handle(self, message: dict[str, Any] | None) -> None:
        if message is None:
            return
        if message["type"] == "message":
            data = message["data"]
            if data in (RESET_HINT, RESET_HINT.encode()):
                self._reset_wanted = True
                return
            self.fan_out(frame("change", data.decode() if isinstance(data, bytes) else data))
        elif message["type"] == "subscribe" and message["data"] == len(self.channels):
            # Every channel is subscribed, at the start or after redis-py reconnected by itself:
            # from here on nothing committed is missed, so boards reload their picture now.
            with self._lock:
                self._live = True
            self.fan_out(RESET)
