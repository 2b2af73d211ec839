"""Snapshots under the interleavings and inputs a reviewer found to break them: a drainer that
lost its lock, tombstones and refused entries, upgraded deployments, overflowing journals."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from callstate.config import Settings
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.rebuild import check, rebuild
from callstate.snapshots import Snapshots
from callstate.store import Store
from tests.factories import body, ended, event
from tests.unit.test_log_truth import (
    RETENTION_MS,
    T0,
    age_out,
    deliver_at,
    log_at,
    notice,
    revisions,
    sweep_at,
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        redis_url="redis://fake",
        embedded_redis=False,
        var_dir=tmp_path,
        shards=2,
        retention_seconds=RETENTION_MS // 1000,
    )


def expired_count(store: Store, shard: int) -> int:
    return int(store.redis.get(store.keys.expired_counter(shard)) or 0)


def test_a_drainer_that_lost_its_lock_cannot_resurrect_a_call_a_snapshot_retired(
    store: Store, drainer: Drainer, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver_at(store, drainer, 1_000, event("c1", "ringing", 100))
    deliver_at(store, drainer, 2_000, ended("c1", 200, "USER_END_CALL", 5))
    shard = log_at(store, 6_000, {"call_id": "c1", "event": body(notice("c1", "https://rec/1"))})
    real_commit = store.docs.commit
    raced: list[Any] = []

    def lock_expires_and_maintenance_runs(*args: Any) -> bool:
        if not raced:  # the drainer read c1 and applied the notice; then its lock expired
            store.redis.delete(store.keys.drain_lock(shard))
            raced.append(Snapshots(store, machine).advance(shard, T0 + 5_000))
        return real_commit(*args)

    monkeypatch.setattr(store.docs, "commit", lock_expires_and_maintenance_runs)
    drainer.drain(shard)
    assert raced[0] is not None and raced[0].retired == 1
    assert store.docs.get_doc("c1") is None, "the retired call stays retired"
    assert revisions(store, "c1") == [1], "no revision for an event the log refuses"
    assert expired_count(store, shard) == 1
    assert check(store, machine).differing == []


def test_a_drainer_that_lost_its_lock_cannot_undo_a_rebuild(
    store: Store, drainer: Drainer, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver_at(store, drainer, 1_000, event("c2", "ringing", 100))
    good = store.docs.get_doc("c2")
    store.redis.delete(store.keys.call("c2"))  # what the rebuild is run to repair
    shard = log_at(store, 2_000, {"call_id": "c2", "event": body(event("c2", "answered", 150))})
    real_commit = store.docs.commit
    raced: list[bool] = []

    def lock_expires_and_a_rebuild_runs(*args: Any) -> bool:
        if not raced:
            store.redis.delete(store.keys.drain_lock(shard))
            report = rebuild(store, machine)
            raced.append(report.rewritten == 1 and store.docs.get_doc("c2") == good)
        return real_commit(*args)

    monkeypatch.setattr(store.docs, "commit", lock_expires_and_a_rebuild_runs)
    drainer.drain(shard)
    assert raced == [True]
    doc = store.docs.get_doc("c2")
    assert doc is not None and set(doc["timeline"]) == {"ringing", "answered"}
    assert check(store, machine).differing == []


def retire_and_refuse_late(store: Store, drainer: Drainer, machine: CallMachine) -> int:
    """Retire c3, then refuse a late event for it logged just before its tombstone's end."""
    deliver_at(store, drainer, 1_000, event("c3", "ringing", 100))
    deliver_at(store, drainer, 2_000, ended("c3", 200, "USER_END_CALL", 5))
    assert age_out(store, machine, 3_000) == 1
    until_ms = T0 + 2_000 + 2 * RETENTION_MS
    assert deliver_at(store, drainer, until_ms - 1 - T0, event("c3", "ringing", 900)) is None
    assert expired_count(store, store.keys.shard_of("c3")) == 1
    return until_ms


def test_a_tombstone_lasts_while_an_entry_it_refused_may_be_in_the_log(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    until_ms = retire_and_refuse_late(store, drainer, machine)
    expires_at_ms = store.redis.pttl(store.keys.tombstone("c3")) + store.log.server_time_ms()
    # The refused entry is trimmed once it is older than retention and a snapshot interval,
    # later if maintenance runs late: its tombstone must outlast that.
    trimmed_by_ms = until_ms + RETENTION_MS + store.settings.snapshot_interval_seconds * 1000
    assert expires_at_ms > trimmed_by_ms + RETENTION_MS - 1_000
    assert check(store, machine).differing == []


def test_a_refused_late_event_never_becomes_a_call_with_a_second_revision_1(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    until_ms = retire_and_refuse_late(store, drainer, machine)
    age_out(store, machine, until_ms - T0 + 1)
    shard = store.keys.shard_of("c3")
    assert "c3" not in Snapshots(store, machine).load(shard).docs, "no phantom call"
    assert rebuild(store, machine).rewritten == 0
    sweep_at(store, drainer, until_ms - T0 + 10, "c3", before_ms=until_ms + 5)
    assert revisions(store, "c3") == [1]


def test_settings_refuse_a_snapshot_interval_as_long_as_retention() -> None:
    env = {"CALLSTATE_RETENTION_SECONDS": "60", "CALLSTATE_SNAPSHOT_INTERVAL_SECONDS": "60"}
    with pytest.raises(ValueError, match="SNAPSHOT_INTERVAL"):
        Settings.from_env(env)


def test_rebuild_does_not_degrade_a_history_trimmed_call_once_a_snapshot_covers_it(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c5", "ringing", 100))
    deliver_at(store, drainer, 2_000, event("c5", "answered", 150))
    shard = store.keys.shard_of("c5")
    # As versions before snapshots trimmed: by age, whatever the documents still held.
    store.redis.xtrim(store.keys.log(shard), minid=f"{T0 + 1_500}-0", approximate=False)
    stored = deliver_at(store, drainer, 5_000, notice("c5", "https://rec/5"))
    assert stored is not None and check(store, machine).differing == []
    age_out(store, machine, 3_000)
    report = check(store, machine)
    rebuild(store, machine)
    assert store.docs.get_doc("c5") == stored
    assert report.differing == [] and report.left == {"c5": "history_trimmed"}


def test_a_reused_call_id_numbers_its_revisions_on_from_its_tombstone(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c6", "ringing", 100))
    deliver_at(store, drainer, 2_000, ended("c6", 200, "USER_END_CALL", 5))
    assert age_out(store, machine, 3_000) == 1
    after = 2_000 + 2 * RETENTION_MS
    deliver_at(store, drainer, after, event("c6", "ringing", 300))
    deliver_at(store, drainer, after + 1, ended("c6", 400, "USER_END_CALL", 5))
    assert revisions(store, "c6") == [1, 2]
    assert check(store, machine).differing == []


def test_a_swept_overflowing_call_is_not_retired_before_its_sweep(
    settings: Settings, redis: Redis, machine: CallMachine
) -> None:
    store = Store(redis, dataclasses.replace(settings, max_events_per_call=2))
    drainer = Drainer(store, machine, 7, 60_000, 0, 0, lambda shard: None)
    deliver_at(store, drainer, 1_000, event("c7", "ringing", 100))
    deliver_at(store, drainer, 1_100, event("c7", "answered", 150))
    deliver_at(store, drainer, 1_200, notice("c7", "https://rec/a"))  # overflows the journal
    sweep_at(store, drainer, 5_000, "c7", before_ms=T0 + 2_000)
    swept = store.docs.get_doc("c7")
    assert swept is not None and swept["closed_by"] == "sweeper"
    age_out(store, machine, 3_000)  # the sweep (5_000) straddles 3_000: kept, not retired
    assert store.docs.get_doc("c7") == swept
    assert check(store, machine).differing == []


def test_an_unprocessable_entry_does_not_reopen_a_retired_call(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c8", "ringing", 100))
    deliver_at(store, drainer, 2_000, ended("c8", 200, "USER_END_CALL", 5))
    assert age_out(store, machine, 3_000) == 1
    shard = log_at(store, 4_000, {"call_id": "c8", "event": b"\x01not zlib"})
    drainer.drain(shard)
    assert store.docs.get_doc("c8") is None
    deliver_at(store, drainer, 5_000, ended("c8", 200, "USER_END_CALL", 5))  # a retry
    assert revisions(store, "c8") == [1]
    assert expired_count(store, shard) == 1
    assert check(store, machine).differing == []
