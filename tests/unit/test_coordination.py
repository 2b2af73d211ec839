"""Drain coordination: wake flags and drain locks, compared and set in one command each."""

from __future__ import annotations

from callstate.coordination import new_wake_id, wake_age_ms
from callstate.store import Store


def test_a_wake_flag_is_replaced_only_for_the_job_it_stands_for(store: Store) -> None:
    held = store.coordination.wakes.claim(1)
    assert held is not None and store.coordination.wakes.claim(1) is None
    assert store.coordination.wakes.replace(1, "drain-0-someoneelse") is None
    assert store.coordination.wakes.holder(1) == held
    replaced = store.coordination.wakes.replace(1, held)
    assert replaced is not None and replaced != held
    assert store.coordination.wakes.holder(1) == replaced


def test_a_wake_ids_age_is_read_from_it_and_a_foreign_id_counts_as_old() -> None:
    assert 0 <= wake_age_ms(new_wake_id()) < 1_000
    assert wake_age_ms("drain-notanumber-abc") > 10**12
    assert wake_age_ms("someone-elses-job-id") > 10**12


def test_a_renewed_lock_lasts_exactly_the_configured_time(store: Store) -> None:
    lock_ms = store.settings.drain_lock_seconds * 1000
    assert store.coordination.locks.acquire(2, "mine")
    store.redis.pexpire(store.keys.drain_lock(2), 10)
    assert store.coordination.locks.renew(2, "mine")
    assert lock_ms - 1_000 < store.redis.pttl(store.keys.drain_lock(2)) <= lock_ms
    assert not store.coordination.locks.renew(2, "not-mine")
