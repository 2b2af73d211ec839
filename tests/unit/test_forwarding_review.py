"""Review of record forwarding: receivers that hold a send past its documented timeout, and a
delivery job that ends in RQ's failed registry instead of the dead letters."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import SimpleWorker
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from rq.timeouts import JobTimeoutException

from callstate import forwarding
from callstate.config import Settings
from callstate.delivery import Destination, Sender
from callstate.machine import CallMachine
from tests.receiver import FAIL, OK, Receiver
from tests.unit.test_forwarding import SECRET, Pipeline, a_call, forwarding_settings

TRICKLE_SECONDS = 5.0  # how long a misbehaving receiver keeps the connection busy at most
TRICKLE_GAP = 0.3  # below the sender's 1 s read timeout: every recv gets a byte in time


def _status_line(conn: socket.socket, stop: float) -> None:
    """The status line, one byte at a time."""
    for byte in b"HTTP/1.1 200 OK\r\n":
        if time.monotonic() > stop:
            return
        conn.sendall(bytes([byte]))
        time.sleep(TRICKLE_GAP)


def _informational(conn: socket.socket, stop: float) -> None:
    """`100 Continue` answers without end (http.client skips them)."""
    while time.monotonic() < stop:
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(TRICKLE_GAP)


def _body(conn: socket.socket, stop: float) -> None:
    """A 200 whose body comes one byte at a time, under the read limit."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n")
    while time.monotonic() < stop:
        conn.sendall(b"x")
        time.sleep(TRICKLE_GAP)


class Trickler:
    """A loopback receiver that answers every request with `answer` for TRICKLE_SECONDS."""

    def __init__(self, answer: Callable[[socket.socket, float], None]) -> None:
        self.answer = answer
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/records"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            try:
                self.answer(conn, time.monotonic() + TRICKLE_SECONDS)
            except OSError:
                return  # the sender gave up: what the test wants

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("answer", [_status_line, _informational, _body])
def test_a_trickling_receiver_cannot_hold_a_send_past_its_timeout(
    answer: Callable[[socket.socket, float], None],
) -> None:
    """README: a send waits at most the timeout (documented, a few seconds). urllib3's read
    timeout bounds each recv, not the answer: a receiver that sends a byte now and then holds
    the forwarder (and its shard lock, and the delivery job past RQ's job timeout) as long as
    it likes."""
    trickler = Trickler(answer)
    try:
        started = time.monotonic()
        Sender(SECRET, 1).send(Destination(trickler.url), "x:1", "{}")
        elapsed = time.monotonic() - started
    finally:
        trickler.close()
    assert elapsed < 3.5, f"a send with a 1 s timeout took {elapsed:.1f} s"


def _run_due_jobs(fwd: forwarding.Forwarder) -> None:
    """What the records worker does, without waiting: every scheduled job due now, then the
    queue in burst mode."""
    registry = ScheduledJobRegistry(queue=fwd.retry_queue)  # type: ignore[no-untyped-call]
    for job_id in registry.get_job_ids():
        registry.remove(job_id)
        fwd.retry_queue._enqueue_job(Job.fetch(job_id, connection=fwd.redis))
    SimpleWorker([fwd.retry_queue], connection=fwd.redis).work(burst=True)


def test_a_delivery_job_that_rq_fails_ends_in_the_dead_letters(
    redis: Redis, tmp_path: Path, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery attempt that never ends by itself (the trickling receiver above, past the
    job's timeout; a worker killed each time) is failed by RQ after its 3 crash retries: the
    revision must then be dead-lettered, not dropped while the call's next revision is sent."""
    receiver = Receiver(SECRET, lambda n: FAIL).__enter__()
    pipe = Pipeline(redis, forwarding_settings(tmp_path, receiver.url), machine)
    fwd: forwarding.Forwarder = pipe.forwarder
    shard = pipe.apply(*a_call("lost-1"))
    pipe.apply({"type": "recording", "call_id": "lost-1", "recording_url": "https://r/3"})
    # The worker below runs jobs in this process: with this forwarder.
    monkeypatch.setattr(forwarding, "_forwarder", fwd)
    fwd.forward(shard)  # revision 1 fails now: a scheduled job, revision 2 waits for it
    [first] = [j for j in pipe.pending_jobs(shard) if not Job.fetch(j, fwd.redis).dependency_ids]

    def stuck(*args: Any) -> Any:
        raise JobTimeoutException("Task exceeded maximum timeout value (32 seconds)")

    monkeypatch.setattr(Sender, "send", stuck)
    for _ in range(6):
        _run_due_jobs(fwd)
        if Job.fetch(first, fwd.redis).get_status().value == "failed":
            break
    monkeypatch.undo()
    monkeypatch.setattr(forwarding, "_forwarder", fwd)
    receiver.behaviour = lambda n: OK
    _run_due_jobs(fwd)
    receiver.__exit__()

    letters = [json.loads(raw) for raw in fwd.redis.lrange(fwd.keys.dead_letters(shard), 0, -1)]
    dead = [letter["revision"] for letter in letters]
    sent_first = receiver.accepted.ids[:1] == ["lost-1:1"]
    assert "lost-1:2" in receiver.accepted.ids
    assert sent_first or 1 in dead, f"revision 1 neither delivered nor dead-lettered: {dead}"
    assert fwd.redis.hlen(fwd.keys.forward_pending(shard)) == 0


def test_a_receiver_that_times_out_does_not_hold_back_the_others(
    redis: Redis, tmp_path: Path, machine: CallMachine
) -> None:
    """A receiver that accepts and never answers costs each forward job one timeout, and the
    slice (1 s) is over by then: every job hands one revision over, so the healthy receiver
    gets one revision a timeout per shard and the outbox grows under any real load."""
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    with Receiver(SECRET) as healthy, silent:
        dead = f"http://127.0.0.1:{silent.getsockname()[1]}/records"
        pipe = Pipeline(redis, forwarding_settings(tmp_path, healthy.url, dead), machine)
        shard = pipe.store.keys.shard_of("hol-0")
        calls = [f"hol-{n}" for n in range(80) if pipe.store.keys.shard_of(f"hol-{n}") == shard]
        for call_id in calls[:6]:
            pipe.apply(*a_call(call_id))
        deadline = time.monotonic() + 3.0
        while pipe.store.redis.xlen(pipe.store.keys.outbox(shard)) and time.monotonic() < deadline:
            pipe.forwarder.forward(shard)  # what the records worker does, job after job
        assert len(healthy.accepted.ids) == 6, f"{len(healthy.accepted.ids)} of 6 in 3 s"


@pytest.mark.parametrize(
    "url",
    [
        "https://user:pa55word@receiver.example/records",  # the sender drops the credentials
        "https://recei ver.example/records?token=pa55word",  # a stray space in the host
    ],
)
def test_settings_refuse_a_receiver_url_that_cannot_be_sent_as_written(url: str) -> None:
    """A URL whose userinfo urllib3's pool would silently drop (every delivery then a 401 for
    24 h, then dead letters), or that holds whitespace, is refused at start, without the URL
    (or its password) in the message."""
    env = {"CALLSTATE_RECORD_WEBHOOK_URL": url, "CALLSTATE_RECORD_WEBHOOK_SECRET": SECRET}
    with pytest.raises(ValueError, match="CALLSTATE_RECORD_WEBHOOK_URL") as refused:
        Settings.from_env(env)
    assert "pa55word" not in str(refused.value)


def _fail_through_rq(
    fwd: forwarding.Forwarder, job_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Let the records worker run `job_id` with every send stuck past the job's timeout until
    RQ, its crash retries spent, fails it."""

    def stuck(*args: Any) -> Any:
        raise JobTimeoutException("Task exceeded maximum timeout value (32 seconds)")

    with monkeypatch.context() as patched:
        patched.setattr(Sender, "send", stuck)
        for _ in range(6):
            _run_due_jobs(fwd)
            if Job.fetch(job_id, fwd.redis).get_status().value == "failed":
                return
    raise AssertionError("RQ did not fail the job")


def test_a_revision_queued_after_a_link_that_failed_meanwhile_is_not_deferred_forever(
    redis: Redis, tmp_path: Path, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward job reads which chain links will still run at a batch's start; a link RQ
    fails after that (or between a redeliver's look and its enqueue) is FAILED when the next
    revision is queued after it. RQ defers a job whose dependency is not FINISHED, whatever
    `allow_failure` says, and a failed job's dependents were released already: the revision
    would wait for ever, and every later revision of the call behind it."""
    with Receiver(SECRET, lambda n: FAIL) as receiver:
        pipe = Pipeline(redis, forwarding_settings(tmp_path, receiver.url), machine)
        fwd: forwarding.Forwarder = pipe.forwarder
        monkeypatch.setattr(forwarding, "_forwarder", fwd)
        shard = pipe.apply(*a_call("race-1"))
        run = forwarding.ShardRun(fwd, shard, "token")
        [first] = fwd.read_outbox(shard, None)
        [dest] = fwd.destinations.values()
        run.hand(first, dest)  # fails now: the call's chain is a scheduled job
        [link] = pipe.pending_jobs(shard)
        fwd.redis.xdel(fwd.keys.outbox(shard), first.entry_id)
        _fail_through_rq(fwd, link, monkeypatch)  # meanwhile: dead-lettered, then failed
        pipe.apply({"type": "recording", "call_id": "race-1", "recording_url": "https://r/4"})
        [second] = fwd.read_outbox(shard, None)
        receiver.behaviour = lambda n: OK
        run.hand(second, dest)  # the run still holds `link` as the call's live link
        _run_due_jobs(fwd)
        statuses = [Job.fetch(j, fwd.redis).get_status().value for j in pipe.pending_jobs(shard)]
        assert receiver.accepted.ids == ["race-1:2"], statuses
