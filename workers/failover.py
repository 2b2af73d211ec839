"""An RQ worker process that outlives a Redis failing under it (a primary failing over, a restart,
a hang): RQ's work loop ends then, and a new worker takes over in the same process."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq import worker_registration
from rq.worker import SimpleWorker

from callstate.redis_server import wait_for_redis

log = logging.getLogger("workers")
# Between two workers when the loop ended with Redis answering: never a busy loop of new ones.
RESTART_PAUSE_SECONDS = 1.0
W = TypeVar("W", bound="StoppableWorker")


class StoppableWorker(SimpleWorker):
    """RQ's in-process worker, remembering that a stop was asked for: its loop also ends, with
    no stop asked, when Redis fails under it, and only then does a new worker take over."""

    stop_asked = False

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        # Before RQ's handler, which raises StopRequested when the worker is idle.
        self.stop_asked = True
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's heartbeat, in one round trip, and a worker missing from RQ's registry registered
        again: a server that lost its data (restarted empty, flushed) under a worker whose
        client reconnected by itself would otherwise count it as dead for good (`/readyz`)."""
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipe)
            pipe.sismember(self.redis_workers_keys, self.key)
            registered = pipe.execute()[-1]
        if not registered:
            with self.connection.pipeline() as pipe:
                pipe.hset(self.key, mapping=self.serialize())
                worker_registration.register(self, pipe)
                pipe.expire(self.key, self.worker_ttl + 60)
                pipe.execute()


def work_through_failovers(new_worker: Callable[[], W], redis: Redis, **work: Any) -> None:
    """Run a worker's loop until a stop is asked for; whenever it ends otherwise, start a new
    worker once Redis answers. RQ quits when Redis fails as a job ends (it cannot record the
    end), and on a socket timeout; under `make run` one process that exits stops them all."""
    while True:
        worker = new_worker()
        try:
            worker.work(**work)
            ended = "its loop ended unasked (RQ quits on a Redis timeout)"
        except RedisError as exc:
            _let_go(worker)
            ended = f"it lost Redis ({exc})"
        if worker.stop_asked:
            return
        log.warning("worker %s: %s; a new one starts when Redis answers", worker.name, ended)
        # RQ's handlers only flag a stop for its loop, which has ended: stop at once instead.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        time.sleep(RESTART_PAUSE_SECONDS)
        wait_for_redis(redis, math.inf)


def _let_go(worker: StoppableWorker) -> None:
    """What RQ's teardown did not reach when Redis failed under it: the worker's pubsub thread,
    which would retry for ever under the dead worker's name."""
    if worker.pubsub_thread is not None:
        worker.pubsub_thread.stop()
        worker.pubsub_thread.join(timeout=1)
    if worker.pubsub is not None:
        with contextlib.suppress(RedisError):
            worker.pubsub.close()
