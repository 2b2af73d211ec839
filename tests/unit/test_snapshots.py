"""Snapshots under the interleavings and inputs a reviewer found to break them: a drainer that
lost its lock, tombstones and refused entries, upgraded deployments, overflowing journals."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from callstate import jobs
from callstate import snapshots as snapshots_module
from callstate.codec import pack, pack_doc
from callstate.config import Settings
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.rebuild import check, rebuild
from callstate.snapshots import HISTORY_TRIMMED, Advanced, Snapshot, Snapshots
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
    return int(store.redis.hget(store.keys.verdicts(shard), "rejected:expired") or 0)


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
    # It stopped at its refused commit and woke a successor, which applies the entry afresh.
    drainer.drain(shard, store.coordination.wakes.holder(shard))
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
    # It stopped at its refused commit and woke a successor, which applies the entry afresh.
    drainer.drain(shard, store.coordination.wakes.holder(shard))
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


def reuse_just_before_the_tombstone_expires(
    store: Store, drainer: Drainer, machine: CallMachine, last: dict[str, Any]
) -> int:
    """c9 is retired with revision 1; its id is reused just before its tombstone would expire."""
    deliver_at(store, drainer, 1_000, event("c9", "ringing", 100))
    deliver_at(store, drainer, 2_000, ended("c9", 200, "USER_END_CALL", 5))
    assert age_out(store, machine, 3_000) == 1
    expires_ms = store.redis.pttl(store.keys.tombstone("c9")) + store.log.server_time_ms()
    again = expires_ms - T0 - 10
    deliver_at(store, drainer, again, event("c9", "ringing", 300))
    deliver_at(store, drainer, again + 1, last)
    # The tombstone now lasts until the new call's entries are covered by a snapshot.
    expires_now_ms = store.redis.pttl(store.keys.tombstone("c9")) + store.log.server_time_ms()
    covered_by_ms = T0 + again + RETENTION_MS + store.settings.snapshot_interval_seconds * 1000
    assert expires_now_ms > covered_by_ms + RETENTION_MS - 1_000
    return again


def test_a_reused_call_keeps_its_numbering_through_check_and_rebuild(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    last = ended("c9", 400, "USER_END_CALL", 5)
    again = reuse_just_before_the_tombstone_expires(store, drainer, machine, last)
    assert revisions(store, "c9") == [1, 2]
    stored = store.docs.get_doc("c9")
    assert check(store, machine).differing == []
    rebuild(store, machine)
    assert store.docs.get_doc("c9") == stored
    deliver_at(store, drainer, again + 2, notice("c9", "https://rec/9"))
    assert revisions(store, "c9") == [1, 2, 3]


def test_a_snapshot_copy_carries_a_reused_calls_numbering_after_its_tombstone_ends(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    last = event("c9", "answered", 350)
    again = reuse_just_before_the_tombstone_expires(store, drainer, machine, last)
    age_out(store, machine, again + 2)  # the active call is copied into the snapshot
    store.redis.delete(store.keys.tombstone("c9"))  # its time is over: the copy remembers
    deliver_at(store, drainer, again + 3, ended("c9", 400, "USER_END_CALL", 5))
    assert revisions(store, "c9") == [1, 2]
    assert check(store, machine).differing == []


def test_rebuild_never_lowers_a_published_revision(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c14", "ringing", 100))
    doc = deliver_at(store, drainer, 2_000, ended("c14", 200, "USER_END_CALL", 5))
    assert doc is not None and doc["record"] is not None
    doc["record"]["revision"] = 5  # as if the record's rules changed since it was published
    store.redis.set(store.keys.call("c14"), pack_doc(doc))
    report = rebuild(store, machine)
    assert report.left == {"c14": "newer_revision"} and report.rewritten == 0
    assert store.docs.get_doc("c14") == doc


@pytest.fixture
def context(settings: Settings, redis: Redis) -> jobs.Context:
    return jobs.configure(dataclasses.replace(settings, stale_after_seconds=60), redis)


def log_old_ended_call(store: Store, call_id: str) -> int:
    """Log and drain an ended call old enough for a snapshot step; return its shard."""
    now = store.log.server_time_ms()
    shard = store.keys.shard_of(call_id)
    old = now - 3 * 3600_000 - 10 * RETENTION_MS
    for ms, payload in ((old, event(call_id, "ringing", 1)), (old + 1, ended(call_id, 2, "X", 1))):
        store.redis.xadd(
            store.keys.log(shard), {"call_id": call_id, "event": body(payload)}, id=f"{ms}-0"
        )
    jobs.drain_shard(shard)
    return shard


@pytest.mark.parametrize(
    "corrupt",
    [b"\x01garbage", b"\xff\xfe", pack(b'"just a string"')],
    ids=["bad-zlib", "not-json", "json-string"],
)
def test_one_corrupt_document_does_not_stop_maintenance(
    context: jobs.Context, corrupt: bytes
) -> None:
    store = context.store
    shard = log_old_ended_call(store, "bad1")
    store.redis.set(store.keys.call("bad1"), corrupt)
    other = next(f"o{i}" for i in range(100) if store.keys.shard_of(f"o{i}") != shard)
    store.log.append_event(other, body(event(other, "ringing", 1)))
    store.redis.delete(store.keys.wake(store.keys.shard_of(other)))  # its job was lost
    assert jobs.maintain()["woken"] == 1
    assert store.redis.get(store.keys.call("bad1")) == corrupt, "left for an operator"


def test_one_corrupt_document_does_not_stop_its_shards_snapshot(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    shard = store.keys.shard_of("c13")
    other = next(f"o{i}" for i in range(100) if store.keys.shard_of(f"o{i}") == shard)
    deliver_at(store, drainer, 1_000, event("c13", "ringing", 100))
    deliver_at(store, drainer, 1_500, ended("c13", 150, "USER_END_CALL", 5))
    deliver_at(store, drainer, 2_000, event(other, "ringing", 100))
    deliver_at(store, drainer, 2_500, ended(other, 200, "USER_END_CALL", 5))
    store.redis.set(store.keys.call("c13"), b"\x01garbage")
    age_out(store, machine, 3_000)
    assert store.docs.get_doc(other) is None, "the other ended call is retired"
    assert check(store, machine).differing == ["c13"], "the corrupt one is reported"


def test_one_corrupt_tombstone_does_not_stop_its_shards_drainer(
    store: Store, drainer: Drainer
) -> None:
    store.redis.set(store.keys.tombstone("c10"), b"garbage")
    assert deliver_at(store, drainer, 1_000, event("c10", "ringing", 100)) is None
    shard = store.keys.shard_of("c10")
    other = next(f"o{i}" for i in range(100) if store.keys.shard_of(f"o{i}") == shard)
    assert deliver_at(store, drainer, 1_100, event(other, "ringing", 100)) is not None
    assert expired_count(store, shard) == 1, "an unreadable tombstone refuses its call"


def test_check_leaves_a_call_whose_snapshot_copy_is_corrupt(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c11", "ringing", 100))
    deliver_at(store, drainer, 2_000, event("c11", "answered", 150))
    age_out(store, machine, 3_000)  # c11 is active: copied into the snapshot
    shard = store.keys.shard_of("c11")
    store.redis.hset(store.keys.snapshot(shard), "c11", b"\x01garbage")
    stored = deliver_at(store, drainer, 4_000, event("c11", "agentEnded", 160))
    report = check(store, machine)
    assert report.differing == [] and report.left == {"c11": "snapshot_unreadable"}
    rebuild(store, machine)
    assert store.docs.get_doc("c11") == stored


def test_check_reports_a_document_that_is_json_but_not_an_object(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c12", "ringing", 100))
    store.redis.set(store.keys.call("c12"), pack(b"[1, 2]"))
    assert check(store, machine).differing == ["c12"]


def test_a_failing_snapshot_step_does_not_stop_maintenance(
    context: jobs.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = context.store
    shard = log_old_ended_call(store, "old1")

    def fails(*args: Any) -> None:
        raise ValueError("a bug in a snapshot step")

    monkeypatch.setattr(context.snapshots, "advance", fails)
    other = next(f"o{i}" for i in range(100) if store.keys.shard_of(f"o{i}") != shard)
    store.log.append_event(other, body(event(other, "ringing", 1)))
    store.redis.delete(store.keys.wake(store.keys.shard_of(other)))  # its job was lost
    assert jobs.maintain()["woken"] == 1


def test_a_call_straddling_several_snapshot_steps_is_carried_from_copy_to_copy(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c15", "ringing", 100))
    as_of_answer = deliver_at(store, drainer, 4_000, event("c15", "answered", 150))
    final = deliver_at(store, drainer, 7_000, ended("c15", 200, "USER_END_CALL", 5))
    shard = store.keys.shard_of("c15")
    snapshots = Snapshots(store, machine)
    age_out(store, machine, 3_000)
    age_out(store, machine, 5_000)
    copy = snapshots.load(shard).docs["c15"]
    assert as_of_answer is not None and copy == pack_doc(as_of_answer), "as of the 2nd position"
    assert check(store, machine).differing == []
    rebuild(store, machine)
    assert store.docs.get_doc("c15") == final
    assert age_out(store, machine, 8_000) == 1
    assert revisions(store, "c15") == [1] and check(store, machine).differing == []


def test_a_snapshot_step_covers_only_entries_logged_before_its_bound(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c16", "ringing", 100))
    deliver_at(store, drainer, 2_000, ended("c16", 200, "USER_END_CALL", 5))
    shard = store.keys.shard_of("c16")
    snapshots = Snapshots(store, machine)
    step = snapshots.advance(shard, T0 + 2_000)  # entries logged before 2_000 only
    assert step is not None and step.position == f"{T0 + 1_000}-0" and step.retired == 0
    assert snapshots.advance(shard, T0 + 2_001) == Advanced(f"{T0 + 2_000}-0", 1, 1, 0)
    assert snapshots.advance(shard, T0 + 9_000) == Advanced(f"{T0 + 2_000}-0", 0, 0, 0)


def test_a_snapshot_step_moves_at_most_its_batch(
    store: Store, drainer: Drainer, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(5):
        deliver_at(store, drainer, 1_000 + n, event(f"s{n}", "ringing", 100))
    monkeypatch.setattr(snapshots_module, "ADVANCE_BATCH", 2)
    steps = [Snapshots(store, machine).advance(shard, T0 + 9_000) for shard in (0, 1)]
    assert all(step is not None and 0 < step.entries <= 2 for step in steps)


def test_a_snapshot_step_writes_nothing_when_its_fence_fails(
    store: Store, drainer: Drainer, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver_at(store, drainer, 1_000, event("c17", "ringing", 100))
    doc = deliver_at(store, drainer, 2_000, ended("c17", 200, "USER_END_CALL", 5))
    shard = store.keys.shard_of("c17")
    snapshots = Snapshots(store, machine)
    real_as_of = snapshots._as_of

    def the_cursor_moves_meanwhile(*args: Any) -> Any:
        store.redis.set(store.keys.cursor(shard), f"{T0 + 2_000}-5")
        return real_as_of(*args)

    monkeypatch.setattr(snapshots, "_as_of", the_cursor_moves_meanwhile)
    assert snapshots.advance(shard, T0 + 3_000) == Advanced(None, 0, 0, 0)
    assert store.docs.get_doc("c17") == doc and snapshots.position(shard) is None
    assert len(store.log.read_range(shard, None, None, 10)) == 2


def test_a_snapshot_step_retires_a_call_whose_document_already_expired(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c18", "ringing", 100))
    deliver_at(store, drainer, 2_000, ended("c18", 200, "USER_END_CALL", 5))
    store.redis.delete(store.keys.call("c18"))  # as its TTL would, had maintenance stopped
    assert age_out(store, machine, 3_000) == 1
    assert store.redis.get(store.keys.tombstone("c18")) is not None


def test_a_snapshot_step_waits_for_a_gap_between_drain_slices(
    store: Store, drainer: Drainer, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver_at(store, drainer, 1_000, event("c19", "ringing", 100))
    shard = store.keys.shard_of("c19")
    real_acquire = store.coordination.locks.acquire
    attempts: list[str] = []

    def busy_twice(shard_: int, token: str) -> bool:
        attempts.append(token)
        return len(attempts) > 2 and real_acquire(shard_, token)

    monkeypatch.setattr(store.coordination.locks, "acquire", busy_twice)
    assert Snapshots(store, machine).advance(shard, T0 + 9_000) is not None
    assert len(attempts) == 3
    monkeypatch.setattr(snapshots_module, "LOCK_WAIT_SECONDS", 0.02)
    attempts.clear()
    monkeypatch.setattr(store.coordination.locks, "acquire", lambda s, t: False)
    assert Snapshots(store, machine).advance(shard, T0 + 9_000) is None


def test_the_history_a_snapshot_cannot_rederive_is_told_by_its_position() -> None:
    marked = Snapshot("5-0", {"a": HISTORY_TRIMMED, "b": b"\x01junk"}, "5-1")
    assert marked.underivable("a", "9-0") == "history_trimmed"
    assert marked.underivable("b", "9-0") == "snapshot_unreadable"
    assert marked.underivable("c", "5-0") == "history_trimmed", "first changed at the position"
    assert marked.underivable("c", "5-1") is None
    assert marked.underivable("c", None) is None
    fresh = Snapshot(None, {}, "7-0")  # no snapshot yet: the log starts at 7-0
    assert fresh.underivable("c", "6-9") == "history_trimmed"
    assert fresh.underivable("c", "7-0") is None
    assert Snapshot(None, {}, None).underivable("c", "1-0") is None


def test_rebuild_rewrites_a_document_changed_without_a_new_revision(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c20", "ringing", 100))
    doc = deliver_at(store, drainer, 2_000, ended("c20", 200, "USER_END_CALL", 5))
    assert doc is not None
    tampered = dict(doc, timeline={"ended": 1})
    store.redis.set(store.keys.call("c20"), pack_doc(tampered))
    report = check(store, machine)
    assert report.differing == ["c20"] and report.compared == 1
    assert rebuild(store, machine).rewritten == 1
    assert store.docs.get_doc("c20") == doc
