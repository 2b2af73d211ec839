"""Drain coordination: each shard's wake flag (a drain job is queued) and its drain lock."""

from __future__ import annotations

import time
import uuid

from redis import Redis

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


def new_wake_id() -> str:
    """The id of the drain job a wake flag stands for; it carries the time it was made, so
    maintenance can tell a flag whose job was never queued from a fresh one."""
    return f"drain-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"


def wake_age_ms(wake_id: str) -> int:
    parts = wake_id.split("-")
    made_ms = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0
    return int(time.time() * 1000) - made_ms


class DrainCoordination:
    """Who drains a shard: the wake flag that stands for its queued job, and the lock held by
    the job (or snapshot step, or rebuild) that is applying it."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.shards)
        self._compare_and_delete = redis.register_script(COMPARE_AND_DELETE)
        self._compare_and_set = redis.register_script(COMPARE_AND_SET)
        self._compare_and_pexpire = redis.register_script(COMPARE_AND_PEXPIRE)

    def claim_wake(self, shard: int) -> str | None:
        """Set the shard's wake flag unless a drain job is queued; a wake id returned obliges
        the caller to queue the drain job of that id."""
        wake_id = new_wake_id()
        return wake_id if self.redis.set(self.keys.wake(shard), wake_id, nx=True) else None

    def clear_wake(self, shard: int, wake_id: str) -> None:
        """The drain job `wake_id` has started: it is no longer queued, so the next event must
        queue one. A flag that names another job is not this job's to clear."""
        self._compare_and_delete(keys=[self.keys.wake(shard)], args=[wake_id])

    def wake_holder(self, shard: int) -> str | None:
        """The id of the drain job the shard's wake flag stands for, if it is set."""
        raw = self.redis.get(self.keys.wake(shard))
        return text(raw) if raw else None

    def replace_wake(self, shard: int, old: str) -> str | None:
        """Make the flag stand for a new drain job if it still stands for `old`; return its id."""
        wake_id = new_wake_id()
        replaced = self._compare_and_set(keys=[self.keys.wake(shard)], args=[old, wake_id])
        return wake_id if replaced else None

    def acquire_drain_lock(self, shard: int, token: str) -> bool:
        ms = self.settings.drain_lock_seconds * 1000
        return bool(self.redis.set(self.keys.drain_lock(shard), token, nx=True, px=ms))

    def renew_drain_lock(self, shard: int, token: str) -> bool:
        """Extend the lock to its full time if `token` still holds it."""
        ms = self.settings.drain_lock_seconds * 1000
        return bool(self._compare_and_pexpire(keys=[self.keys.drain_lock(shard)], args=[token, ms]))

    def release_drain_lock(self, shard: int, token: str) -> bool:
        """Delete the lock only if `token` still holds it (it may have expired and moved on)."""
        return bool(self._compare_and_delete(keys=[self.keys.drain_lock(shard)], args=[token]))
