"""Shard coordination: the wake flags that stand for a shard's queued job (a drain, a forward)
and the drain lock."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from redis import Redis
from rq import Queue

from callstate.config import Settings
from callstate.connection import text
from callstate.keys import Keys

# Compare-and-delete, -set and -pexpire in one command each: unlike WATCH/MULTI they still run
# when Redis is at its memory limit (a transaction is refused there), so a drainer that failed
# for lack of memory does not leave its shard locked until the lock's TTL.
COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2])
    return 1
end
return 0
"""
COMPARE_AND_PEXPIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
ACQUIRE_UNLESS_WANTED = """
if redis.call('EXISTS', KEYS[2]) == 1 then
    return 0
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
LOCK_POLL_SECONDS = 0.005
LOCK_FREE = 2

# A job that could not take its shard: if a drain job holds the shard's lock, the flag passes to
# it (that job lets go of the flag after the lock, then looks at the log again); otherwise, or if
# the flag no longer names the job, the flag is let go of. One script: the holder cannot let go
# between the two reads. KEYS: flag, lock; ARGV: the job's id, the drain jobs' id prefix.
# Returns 1 when the flag passed to the holder, 2 when nobody holds the lock any more (the
# holder let go meanwhile: its last look may have found the flag naming this job), else 0.
HAND_FLAG_TO_HOLDER = """
local holder = redis.call('GET', KEYS[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then
    if holder and string.sub(holder, 1, string.len(ARGV[2])) == ARGV[2] then
        redis.call('SET', KEYS[1], holder)
        return 1
    end
    redis.call('DEL', KEYS[1])
end
if not holder then
    return 2
end
return 0
"""

# How old a wake flag must be before maintenance takes its job for lost: a claim is followed
# by its enqueue within milliseconds.
LOST_WAKE_GRACE_MS = 5000


DRAIN_KIND = "drain"


def new_wake_id(kind: str = DRAIN_KIND) -> str:
    """The id of the job a wake flag stands for; it carries the time it was made, so
    maintenance can tell a flag whose job was never queued from a fresh one."""
    return f"{kind}-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"


def wake_age_ms(wake_id: str) -> int:
    parts = wake_id.split("-")
    made_ms = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0
    return int(time.time() * 1000) - made_ms


class WakeFlags:
    """One wake flag per shard, holding the id of the job of `kind` that is queued for it and has
    not started: only whoever sets the flag queues a job, so a shard never has two queued."""

    def __init__(self, redis: Redis, key: Callable[[int], str], kind: str) -> None:
        self.redis = redis
        self.key = key
        self.kind = kind
        self._compare_and_delete = redis.register_script(COMPARE_AND_DELETE)
        self._compare_and_set = redis.register_script(COMPARE_AND_SET)

    def claim(self, shard: int) -> str | None:
        """Set the flag unless a job is queued; a wake id returned obliges the caller to queue
        the job of that id."""
        wake_id = new_wake_id(self.kind)
        return wake_id if self.redis.set(self.key(shard), wake_id, nx=True) else None

    def hold(self, shard: int, job: str) -> bool:
        """While `job` holds the shard, make the flag name it unless a queued job's id is there:
        events logged meanwhile need no job of their own."""
        return bool(self.redis.set(self.key(shard), job, nx=True))

    def clear(self, shard: int, wake_id: str) -> None:
        """The job `wake_id` has let go of the shard, or could not take it: the next wake must
        queue one. A flag that names another job is not this job's to clear."""
        self._compare_and_delete(keys=[self.key(shard)], args=[wake_id])

    def holder(self, shard: int) -> str | None:
        raw = self.redis.get(self.key(shard))
        return text(raw) if raw else None

    def replace(self, shard: int, old: str) -> str | None:
        """Make the flag stand for a new job if it still stands for `old`; return its id."""
        wake_id = new_wake_id(self.kind)
        replaced = self._compare_and_set(keys=[self.key(shard)], args=[old, wake_id])
        return wake_id if replaced else None

    def replace_lost(self, shard: int, queue: Queue) -> str | None:
        """A flag whose job is not queued (the process that claimed it died before queueing
        it, or the job was killed before it cleared it) would keep the shard from ever being
        woken: after a grace period, point it at a new job, whose id the caller must queue."""
        holder = self.holder(shard)
        if holder is None or wake_age_ms(holder) < LOST_WAKE_GRACE_MS:
            return None
        # In the queue's list, not by the job's status: a worker that died right after taking
        # a job leaves it marked queued although nobody will run it.
        if queue.get_job_position(holder) is not None:
            return None
        return self.replace(shard, holder)


class ShardLocks:
    """One lock per shard, held by a token for `ttl_ms` and renewed by its holder; whoever holds
    it is the shard's only worker of its kind. With `wanted`, a waiter (a snapshot step, a
    trim, a rebuild) marks the lock wanted: drain jobs then hand it over at their next slice's
    end and do not take it meanwhile."""

    def __init__(
        self,
        redis: Redis,
        key: Callable[[int], str],
        ttl_ms: int,
        wanted: Callable[[int], str] | None = None,
    ) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self.wanted_key = wanted
        self._compare_and_delete = redis.register_script(COMPARE_AND_DELETE)
        self._compare_and_pexpire = redis.register_script(COMPARE_AND_PEXPIRE)
        self._acquire_unless_wanted = redis.register_script(ACQUIRE_UNLESS_WANTED)

    def acquire(self, shard: int, token: str) -> bool:
        return bool(self.redis.set(self.key(shard), token, nx=True, px=self.ttl_ms))

    def acquire_unless_wanted(self, shard: int, token: str) -> bool:
        """What a drain job does: take the lock only if no waiter marked it wanted."""
        if self.wanted_key is None:
            return self.acquire(shard, token)
        keys = [self.key(shard), self.wanted_key(shard)]
        return bool(self._acquire_unless_wanted(keys=keys, args=[token, self.ttl_ms]))

    def acquire_waiting(self, shard: int, token: str, seconds: float) -> bool:
        """Take the lock, marking it wanted and polling for up to `seconds`."""
        deadline = time.monotonic() + seconds
        wanted = self.wanted_key(shard) if self.wanted_key is not None else None
        marked = False
        try:
            while not self.acquire(shard, token):
                if time.monotonic() >= deadline:
                    return False
                if wanted is not None and not marked:
                    marked = bool(self.redis.set(wanted, token, px=max(1, int(seconds * 1000))))
                time.sleep(LOCK_POLL_SECONDS)
            return True
        finally:
            if wanted is not None:
                self._compare_and_delete(keys=[wanted], args=[token])

    def is_wanted(self, shard: int) -> bool:
        return self.wanted_key is not None and bool(self.redis.exists(self.wanted_key(shard)))

    def renew(self, shard: int, token: str) -> bool:
        """Extend the lock to its full time if `token` still holds it."""
        return bool(self._compare_and_pexpire(keys=[self.key(shard)], args=[token, self.ttl_ms]))

    def release(self, shard: int, token: str) -> bool:
        """Delete the lock only if `token` still holds it (it may have expired and moved on)."""
        return bool(self._compare_and_delete(keys=[self.key(shard)], args=[token]))


class DrainCoordination:
    """Who drains a shard: the wake flag that stands for its queued job, and the lock held by
    the job (or snapshot step, or rebuild) that is applying it."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.shards)
        self.wakes = WakeFlags(redis, self.keys.wake, DRAIN_KIND)
        self.locks = ShardLocks(
            redis,
            self.keys.drain_lock,
            settings.drain_lock_seconds * 1000,
            wanted=self.keys.drain_lock_wanted,
        )
        self._hand_flag_to_holder = redis.register_script(HAND_FLAG_TO_HOLDER)

    def leave_flag(self, shard: int, wake_id: str) -> bool:
        """The job `wake_id` could not take its shard: the drain job that holds it takes over
        its flag, so events keep needing no job of their own; else the flag is let go of. True
        when nobody holds the lock any more: the caller must look at the log itself."""
        left = self._hand_flag_to_holder(
            keys=[self.keys.wake(shard), self.keys.drain_lock(shard)],
            args=[wake_id, f"{DRAIN_KIND}-"],
        )
        return int(left) == LOCK_FREE

    def held_by_its_flag(self, shard: int) -> bool:
        """Whether the job the wake flag names holds the shard's lock: a running drain, not a
        lost wake (once its lock expires, a job killed while holding is a lost wake again)."""
        flag, lock = self.redis.mget(self.keys.wake(shard), self.keys.drain_lock(shard))
        return flag is not None and flag == lock
