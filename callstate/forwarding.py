"""Record forwarding: every record revision a commit publishes, signed and POSTed to each
receiver of CALLSTATE_RECORD_WEBHOOK_URL, in per-call order, retried with RQ's own `Retry`.

The drainers' commits append each revision to their shard's outbox (one XADD in the commit's
transaction) and wake the shard's forwarder: one `forward_shard` job, queued only by whoever
claims the shard's forward wake flag. The forwarder sends each revision at once, from one
process, over kept-alive connections; only a delivery that fails becomes an RQ job of its own
(`deliver`), retried on a doubling schedule up to CALLSTATE_RECORD_RETRY_TOTAL_SECONDS and then
put in the shard's dead-letter list. While a call has such a job for a receiver, the call's later
revisions for that receiver are queued as jobs that depend on it (RQ's `Dependency`), so a
receiver never gets revision N+1 before N was delivered or dead-lettered.

The outboxes, forward wake flags and locks are data, next to the commits that fill them; what
tracks delivery jobs (pending deliveries, each call's chain, the counters, the dead letters) lives
with RQ's jobs on the queue's Redis, because its transactions WATCH job keys and queue jobs.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq import Callback, Queue, Retry
from rq.job import Dependency, Job, get_current_job

from callstate.codec import unpack
from callstate.config import Settings
from callstate.connection import StreamRows, text
from callstate.coordination import ShardLocks, WakeFlags
from callstate.delivery import Destination, Sender, webhook_id
from callstate.figures import entries_behind
from callstate.keys import Keys

log = logging.getLogger(__name__)
FORWARD_JOB = "callstate.forwarding.forward_shard"
DELIVER_JOB = "callstate.forwarding.deliver"
DELIVERY_FAILED = "callstate.forwarding.delivery_failed"
# Entries read from the outbox at once, and how long one forward job keeps its shard: a steady
# stream of records costs one RQ job per slice, not one per record.
BATCH = 100
SLICE_SECONDS = 1.0
LINGER_MS = 100
# While the event workers are this many log entries behind, a forward job hands over at most
# YIELD_BATCH revisions and then rests for the rest of its slice: on a busy machine forwarding
# yields the CPU to applying events, and the outbox holds what waits.
YIELD_BACKLOG = 1000
YIELD_BATCH = 20
RETRY_CAP_SECONDS = 3600
FAILED_JOB_TTL_SECONDS = 24 * 3600
# A forward job renews its lock between revisions, and one revision may wait for every
# receiver's timeout (connect and read): the lock outlasts that.
LOCK_SECONDS = 30
# A job whose status is one of these will still run: a later revision may wait for it.
PENDING_STATUSES = (b"queued", b"started", b"deferred", b"scheduled")

# The end of a delivery job, in one step: forget what it was to send, end its call's chain if it
# is still the last link, count how it ended and, when it gave up, keep it as a dead letter.
FINISH = """
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then
    redis.call('HDEL', KEYS[2], ARGV[2])
end
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
if ARGV[4] ~= '' then
    redis.call('LPUSH', KEYS[4], ARGV[4])
end
return 1
"""


def retry_schedule(first_seconds: int, total_seconds: int) -> list[int]:
    """Seconds between a delivery's attempts: `first_seconds`, doubling, at most an hour, for as
    long as they add up to no more than `total_seconds`."""
    schedule: list[int] = []
    step = first_seconds
    while sum(schedule) + step <= total_seconds:
        schedule.append(step)
        step = min(step * 2, RETRY_CAP_SECONDS)
    return schedule


@dataclass(frozen=True)
class Revision:
    """One outbox entry: a record revision owed to every receiver."""

    entry_id: str
    call_id: str
    revision: int
    record: str

    @property
    def message_id(self) -> str:
        return webhook_id(self.call_id, self.revision)


@dataclass(frozen=True)
class Pending:
    """A delivery handed to an RQ job: what to send, to which receiver."""

    destination: str
    call_id: str
    revision: int
    record: str

    def dumps(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def loads(cls, raw: bytes | str) -> Pending:
        return cls(**json.loads(raw))


class Forwarder:
    """A deployment's record forwarding: the outboxes, their forward jobs, the delivery jobs
    and the dead letters."""

    def __init__(self, redis: Redis, settings: Settings, queue_redis: Redis | None = None) -> None:
        self.redis = redis
        self.queue_redis = queue_redis or redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.shards)
        self.queue = Queue(settings.record_queue_name, connection=self.queue_redis)
        self.retry_queue = Queue(settings.record_retry_queue_name, connection=self.queue_redis)
        self.wakes = WakeFlags(redis, self.keys.forward_wake, "forward")
        self.destinations = {d.id: d for d in map(Destination, settings.record_webhook_urls)}
        self.schedule = retry_schedule(
            settings.record_retry_first_seconds, settings.record_retry_total_seconds
        )
        self.lock_seconds = LOCK_SECONDS + 2 * settings.record_webhook_timeout_seconds * len(
            self.destinations
        )
        self.locks = ShardLocks(redis, self.keys.forward_lock, self.lock_seconds * 1000)
        self._finish = self.queue_redis.register_script(FINISH)
        self._sender: Sender | None = None
        # Receivers that failed a send of this process's, until when (monotonic): the next
        # forward jobs queue their revisions instead of each waiting for a timeout again.
        self.failing_until: dict[str, float] = {}

    @property
    def sender(self) -> Sender:
        """Made on first use: the drainers' processes only wake forward jobs, never send."""
        if self._sender is None:
            secret = self.settings.record_webhook_secret
            assert secret is not None  # the settings refuse URLs without one
            self._sender = Sender(secret, self.settings.record_webhook_timeout_seconds)
        return self._sender

    # Waking ------------------------------------------------------------------------------------

    def wake(self, shard: int) -> bool:
        """Queue the shard's forward job unless one is queued; True if this call queued it."""
        wake_id = self.wakes.claim(shard)
        if wake_id is None:
            return False
        self.enqueue_forward(shard, wake_id)
        return True

    def enqueue_forward(self, shard: int, wake_id: str) -> None:
        self.queue.enqueue(
            FORWARD_JOB,
            shard,
            wake_id,
            job_id=wake_id,
            job_timeout=self.lock_seconds * 4,
            result_ttl=0,
            failure_ttl=FAILED_JOB_TTL_SECONDS,
            description=f"forward records of shard {shard}",
        )

    def wake_stuck(self) -> int:
        """For maintenance: wake every shard whose outbox holds entries and has no forward job
        queued (its wake was lost to a crash); return how many were woken."""
        woken = 0
        for shard in range(self.settings.shards):
            if self.redis.xlen(self.keys.outbox(shard)) and (
                self.wake(shard) or self._rewake_if_lost(shard)
            ):
                woken += 1
        return woken

    def _rewake_if_lost(self, shard: int) -> bool:
        wake_id = self.wakes.replace_lost(shard, self.queue)
        if wake_id is None:
            return False
        self.enqueue_forward(shard, wake_id)
        return True

    # The forward job ---------------------------------------------------------------------------

    def forward(self, shard: int, wake_id: str | None = None) -> int:
        """Hand the shard's outbox over, in order, until it is quiet or the slice ends; return
        how many revisions. A job that finds the shard locked leaves: the holder looks at the
        outbox again after it lets go."""
        if wake_id is not None:
            self.wakes.clear(shard, wake_id)
        handed = 0
        while True:
            token = uuid.uuid4().hex
            if not self.locks.acquire(shard, token):
                return handed
            try:
                count, quiet = ShardRun(self, shard, token).run()
                handed += count
            finally:
                self.locks.release(shard, token)
            if not quiet:
                self.wake(shard)
                return handed
            if not self.redis.xlen(self.keys.outbox(shard)):
                return handed

    def read_outbox(
        self, shard: int, after: str | None, block_ms: int = 0, count: int = BATCH
    ) -> list[Revision]:
        if block_ms:
            found = cast(
                list[tuple[bytes, StreamRows]] | None,
                self.redis.xread({self.keys.outbox(shard): after or "0-0"}, 1, block=block_ms),
            )
            return [_revision(row) for row in found[0][1]] if found else []
        start = f"({after}" if after else "-"
        rows = cast(StreamRows, self.redis.xrange(self.keys.outbox(shard), start, count=count))
        return [_revision(row) for row in rows]

    # Delivery jobs -----------------------------------------------------------------------------

    def enqueue_delivery(
        self,
        pipe: Pipeline,
        shard: int,
        pending: Pending,
        after_job: str | None,
        delay_seconds: int,
        tried: int,
    ) -> str:
        """Queue, on `pipe`'s transaction, the RQ job that delivers `pending` and make it its
        call's last link: after `after_job` when given, else in `delay_seconds`. `tried` is how
        many attempts were made already (the forwarder's own)."""
        job_id = f"deliver-{uuid.uuid4().hex}"
        options: dict[str, Any] = {
            "job_id": job_id,
            "job_timeout": self.settings.record_webhook_timeout_seconds * 2 + 30,
            "result_ttl": 0,
            "failure_ttl": FAILED_JOB_TTL_SECONDS,
            # A worker killed during an attempt: RQ retries the job (its own returned Retry
            # only covers attempts that end).
            "retry": Retry(max=3, interval=self.settings.record_retry_first_seconds),
            # When those are spent RQ fails the job and lets the call's next revision go:
            # this revision becomes a dead letter first.
            "on_failure": Callback(DELIVERY_FAILED),
            "description": f"deliver a record revision of shard {shard}",
            "pipeline": pipe,
        }
        if after_job is not None:
            dependency = Dependency(jobs=[after_job], allow_failure=True)
            self.retry_queue.enqueue(DELIVER_JOB, shard, tried, depends_on=dependency, **options)
        elif delay_seconds:
            delay = timedelta(seconds=delay_seconds)
            self.retry_queue.enqueue_in(delay, DELIVER_JOB, shard, tried, **options)
        else:
            self.retry_queue.enqueue(DELIVER_JOB, shard, tried, **options)
        # RQ has put `pipe` in its transaction (MULTI, or buffering for one): these join it.
        pipe.hset(self.keys.forward_pending(shard), job_id, pending.dumps())
        pipe.hset(self.keys.forward_chains(shard), chain_field(pending), job_id)
        return job_id

    def deliver(self, shard: int, tried: int, job_id: str, retries: int) -> Retry | None:
        """One attempt of a delivery job, `retries` after its first; `tried` steps of the
        schedule were behind it when it was queued. A Retry returned asks RQ for the next
        attempt (returned, not raised: RQ logs a raised exception's traceback at ERROR)."""
        raw = self.queue_redis.hget(self.keys.forward_pending(shard), job_id)
        if raw is None:  # already delivered: a job RQ ran again after its worker died
            return None
        pending = Pending.loads(cast(bytes, raw))
        destination = self.destinations.get(pending.destination)
        if destination is None:
            self._end(shard, job_id, pending, "dead_lettered", "receiver no longer configured")
            return None
        outcome = self.sender.send(
            destination, webhook_id(pending.call_id, pending.revision), pending.record
        )
        if outcome.delivered:
            self._end(shard, job_id, pending, "delivered")
            return None
        left = self.schedule[tried:]
        attempt = tried + retries + 1
        self.count(shard, "failed")
        if retries < len(left):
            self.warn(destination, pending, outcome.problem, attempt, left[retries])
            return Retry(max=len(left), interval=left)
        self.warn(destination, pending, outcome.problem, attempt, None)
        self._end(shard, job_id, pending, "dead_lettered", outcome.problem)
        return None

    def give_up(self, shard: int, job_id: str, problem: str) -> None:
        """End a delivery job that RQ failed (it raised, outlived its timeout or its worker
        died, with no retry left) as a dead letter, unless it had ended already."""
        raw = self.queue_redis.hget(self.keys.forward_pending(shard), job_id)
        if raw is not None:
            self._end(shard, job_id, Pending.loads(cast(bytes, raw)), "dead_lettered", problem)

    def _end(
        self, shard: int, job_id: str, pending: Pending, how: str, problem: str | None = None
    ) -> None:
        letter = ""
        if how == "dead_lettered":
            letter = json.dumps(
                {
                    **pending.__dict__,
                    "failed_ms": int(time.time() * 1000),
                    "problem": problem,
                    "id": job_id,
                }
            )
        keys = self.keys
        self._finish(
            keys=[
                keys.forward_pending(shard),
                keys.forward_chains(shard),
                keys.forward_counters(shard),
                keys.dead_letters(shard),
            ],
            args=[job_id, chain_field(pending), how, letter],
        )

    def count(self, shard: int, name: str, amount: int = 1) -> None:
        self.queue_redis.hincrby(self.keys.forward_counters(shard), name, amount)

    def warn(
        self,
        destination: Destination,
        pending: Pending,
        problem: str | None,
        attempt: int,
        next_in: int | None,
    ) -> None:
        then = f"next attempt in {next_in} s" if next_in is not None else "dead-lettered"
        log.warning(
            "record %s revision %d to %s (%s): attempt %d failed (%s); %s",
            pending.call_id,
            pending.revision,
            destination.place,
            destination.id,
            attempt,
            problem,
            then,
            extra={"call_id": pending.call_id, "destination": destination.id},
        )

    # Dead letters ------------------------------------------------------------------------------

    def redeliver(self) -> tuple[int, int]:
        """Queue every dead letter whose receiver is still configured for delivery again, with
        a fresh retry schedule, each removed from its list in the transaction that queues it;
        return how many were queued and how many were kept (receiver no longer configured)."""
        queued = kept = 0
        for shard in range(self.settings.shards):
            for raw in self._dead_letters(shard):
                letter = json.loads(raw)
                if letter["destination"] not in self.destinations:
                    kept += 1
                    continue
                queued += self._redeliver_one(shard, raw, letter)
        return queued, kept

    def _dead_letters(self, shard: int) -> Iterator[str]:
        """Oldest first; a snapshot, each letter checked again as it is taken."""
        letters = cast(list[bytes], self.queue_redis.lrange(self.keys.dead_letters(shard), 0, -1))
        yield from (text(raw) for raw in reversed(letters))

    def _redeliver_one(self, shard: int, raw: str, letter: dict[str, Any]) -> int:
        pending = Pending(
            letter["destination"], letter["call_id"], letter["revision"], letter["record"]
        )
        key = self.keys.dead_letters(shard)
        while True:
            with self.queue_redis.pipeline() as pipe:
                try:
                    pipe.watch(key, self.keys.forward_chains(shard))  # type: ignore[no-untyped-call]
                    if pipe.lpos(key, raw) is None:  # taken by another redeliver meanwhile
                        return 0
                    after = self.live_chain(pipe, shard, pending)
                    self.enqueue_delivery(pipe, shard, pending, after, 0, 0)
                    pipe.lrem(key, 1, raw)
                    pipe.execute()
                    return 1
                except WatchError:
                    continue

    def live_chain(self, pipe: Pipeline, shard: int, pending: Pending) -> str | None:
        """The job a delivery of `pending` must wait for: its call's last link for that
        receiver, if that job will still run (a job that failed or ended does not hold it).
        `pipe` watches the chains already."""
        raw = pipe.hget(self.keys.forward_chains(shard), chain_field(pending))
        return self.still_pending(pipe, text(raw)) if raw is not None else None

    def still_pending(self, pipe: Pipeline, job_id: str) -> str | None:
        """`job_id` if that job will still run, looked at under `pipe`'s WATCH: RQ defers a job
        whose dependency is not FINISHED even with `allow_failure`, so a delivery queued after a
        link that failed meanwhile would wait for ever; the WATCH makes the enqueue fail instead."""
        key = Job.key_for(job_id)
        pipe.watch(key)  # type: ignore[no-untyped-call]
        return job_id if pipe.hget(key, "status") in PENDING_STATUSES else None


class ShardRun:
    """One forward job's hold on a shard: the outbox handed over batch by batch, each revision
    sent to every receiver at once, or to a delivery job when it cannot be."""

    def __init__(self, forwarder: Forwarder, shard: int, token: str) -> None:
        self.forwarder = forwarder
        self.shard = shard
        self.token = token
        self.deadline = time.monotonic() + SLICE_SECONDS
        self.renewed = time.monotonic()
        # Receivers that failed lately: their next revisions go to delivery jobs straight
        # away, instead of each waiting for its own timeout here.
        now = time.monotonic()
        self.failing = {d for d, until in forwarder.failing_until.items() if until > now}
        self.chains: dict[str, str | None] = {}

    def run(self) -> tuple[int, bool]:
        """Hand revisions over until the outbox stays quiet (True) or the slice ends (False)."""
        fwd, handed, after = self.forwarder, 0, None
        if entries_behind(fwd.redis, fwd.keys) > YIELD_BACKLOG:
            return self.yield_to_events()
        while True:
            batch = fwd.read_outbox(self.shard, after)
            if not batch:
                wait_ms = min(LINGER_MS, int((self.deadline - time.monotonic()) * 1000))
                if handed and wait_ms > 0 and fwd.read_outbox(self.shard, after, wait_ms):
                    continue
                return handed, True
            done = self.hand_over(batch)
            handed += done
            if done < len(batch) or time.monotonic() >= self.deadline:
                return handed, False
            after = batch[-1].entry_id

    def yield_to_events(self) -> tuple[int, bool]:
        """The event workers are behind: hand a few revisions over, rest until the slice ends,
        and leave the rest of the outbox to the next job."""
        batch = self.forwarder.read_outbox(self.shard, None, count=YIELD_BATCH)
        if not batch:
            return 0, True
        handed = self.hand_over(batch)
        time.sleep(max(0.0, self.deadline - time.monotonic()))
        return handed, False

    def hand_over(self, batch: list[Revision]) -> int:
        """Deliver or queue each revision of the batch for every receiver, then drop them from
        the outbox; stop early at the slice's end or if the lock was lost."""
        fwd = self.forwarder
        self._load_chains(batch)
        done: list[Revision] = []
        delivered = 0
        for revision in batch:
            if done and (time.monotonic() >= self.deadline or not self._keep_lock()):
                break
            delivered += sum(self.hand(revision, dest) for dest in fwd.destinations.values())
            done.append(revision)
        if delivered:
            fwd.count(self.shard, "delivered", delivered)
        fwd.redis.xdel(fwd.keys.outbox(self.shard), *(r.entry_id for r in done))
        return len(done)

    def hand(self, revision: Revision, dest: Destination) -> bool:
        """Send one revision to one receiver, or queue its delivery job; True if delivered."""
        fwd = self.forwarder
        pending = Pending(dest.id, revision.call_id, revision.revision, revision.record)
        field = chain_field(pending)
        after = self.chains.get(field)
        if after is None and dest.id not in self.failing:
            outcome = fwd.sender.send(dest, revision.message_id, revision.record)
            if outcome.delivered:
                return True
            fwd.count(self.shard, "failed")
            fwd.warn(dest, pending, outcome.problem, 1, fwd.schedule[0] if fwd.schedule else 0)
            self.failing.add(dest.id)
            pause = fwd.schedule[0] if fwd.schedule else 0
            fwd.failing_until[dest.id] = time.monotonic() + pause
        self.chains[field] = self._queue(pending, after)
        return False

    def _queue(self, pending: Pending, after: str | None) -> str:
        """A delivery job: after `after` while that link will still run; without one, in the
        schedule's first step, which then counts as behind it (the forwarder's own attempt, or
        the receiver failing just now); at once if the link ended since the run looked."""
        fwd = self.forwarder
        while True:
            with fwd.queue_redis.pipeline() as pipe:
                try:
                    link = fwd.still_pending(pipe, after) if after is not None else None
                    tried = 0 if after is not None else 1
                    delay = fwd.schedule[0] if fwd.schedule and after is None else 0
                    job_id = fwd.enqueue_delivery(pipe, self.shard, pending, link, delay, tried)
                    pipe.execute()
                    return job_id
                except WatchError:  # the link changed state as we looked at it: look again
                    continue

    def _load_chains(self, batch: list[Revision]) -> None:
        """Which of the batch's calls have a delivery job that will still run, per receiver:
        two round trips for the whole batch, one when no call has any."""
        fwd = self.forwarder
        fields = sorted(
            {f"{dest}:{r.call_id}" for r in batch for dest in fwd.destinations} - set(self.chains)
        )
        if not fields:
            return
        found = fwd.queue_redis.hmget(fwd.keys.forward_chains(self.shard), fields)
        jobs = {field: text(raw) for field, raw in zip(fields, found, strict=True) if raw}
        statuses: list[bytes | None] = []
        if jobs:
            pipe = fwd.queue_redis.pipeline(transaction=False)
            for job_id in jobs.values():
                pipe.hget(Job.key_for(job_id), "status")
            statuses = pipe.execute()
        live = {
            field
            for field, status in zip(jobs, statuses, strict=True)
            if status in PENDING_STATUSES
        }
        for field in fields:
            self.chains[field] = jobs[field] if field in live else None

    def _keep_lock(self) -> bool:
        if time.monotonic() - self.renewed < LOCK_SECONDS / 3:  # the margin above the sends
            return True
        self.renewed = time.monotonic()
        return self.forwarder.locks.renew(self.shard, self.token)


def chain_field(pending: Pending) -> str:
    return f"{pending.destination}:{pending.call_id}"


def _revision(row: tuple[bytes, dict[bytes, bytes]]) -> Revision:
    entry_id, fields = row
    return Revision(
        text(entry_id),
        text(fields[b"call_id"]),
        int(fields[b"revision"]),
        unpack(fields[b"record"]).decode(),
    )


# RQ finds job functions by import path: the records worker sets this process's forwarder up
# with `configure` before it starts working.
_forwarder: Forwarder | None = None


def configure(settings: Settings, redis: Redis, queue_redis: Redis | None = None) -> Forwarder:
    global _forwarder
    _forwarder = Forwarder(redis, settings, queue_redis)
    return _forwarder


def forwarder() -> Forwarder:
    if _forwarder is None:
        raise RuntimeError("forwarding jobs run in a worker started by workers/records.py")
    return _forwarder


def forward_shard(shard: int, wake_id: str | None = None) -> int:
    """The forward job of a shard."""
    return forwarder().forward(shard, wake_id)


def deliver(shard: int, tried: int) -> Retry | None:
    """A delivery job: one attempt; RQ schedules the next from the Retry it returns."""
    job = get_current_job()
    assert job is not None
    return forwarder().deliver(shard, tried, job.id, job.number_of_retries or 0)


def delivery_failed(job: Job, connection: Redis, kind: type[BaseException], *exc: object) -> None:
    """RQ's failure callback of a delivery job, run before RQ retries the job or, with no retry
    left, fails it and queues the call's next revision: then the revision is dead-lettered."""
    if not job.should_retry:
        forwarder().give_up(int(job.args[0]), job.id, kind.__name__)
