"""The log stays the truth at any age: snapshots, retired calls, a check on a live system and a
fenced rebuild (each test reproduced a failure of the version before snapshots)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.typing import EncodableT, FieldT

from callstate import rebuild as rebuild_module
from callstate.calls import Doc
from callstate.config import Settings
from callstate.connection import text
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.rebuild import HISTORY_TRIMMED, check, rebuild
from callstate.snapshots import Snapshots
from callstate.store import Store
from tests.factories import body, ended, event, published, record_of

Deliver = Callable[..., Doc]
RETENTION_MS = 60_000
T0 = int(time.time() * 1000) - 2 * RETENTION_MS


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        redis_url="redis://fake",
        embedded_redis=False,
        var_dir=tmp_path,
        shards=2,
        retention_seconds=RETENTION_MS // 1000,
    )


def notice(call_id: str, url: str) -> dict[str, Any]:
    return {"call_id": call_id, "type": "recording", "recording_url": url}


def revisions(store: Store, call_id: str) -> list[int]:
    rows = published(store.redis, store.keys)
    found = [json.loads(fields[b"record"]) for _, fields in rows]
    return [record["revision"] for record in found if record["call_id"] == call_id]


def log_at(store: Store, ms: int, fields: dict[FieldT, EncodableT]) -> int:
    """Log an entry at `ms` after T0 (two retentions ago), as if it had been received then."""
    shard = store.keys.shard_of(str(fields["call_id"]))
    store.redis.xadd(store.keys.log(shard), fields, id=f"{T0 + ms}-0")
    return shard


def deliver_at(store: Store, drainer: Drainer, ms: int, payload: dict[str, Any]) -> Doc | None:
    shard = log_at(store, ms, {"call_id": payload["call_id"], "event": body(payload)})
    drainer.drain(shard)
    return store.docs.get_doc(payload["call_id"])


def sweep_at(store: Store, drainer: Drainer, ms: int, call_id: str, before_ms: int) -> None:
    drainer.drain(log_at(store, ms, {"call_id": call_id, "sweep_before_ms": before_ms}))


def age_out(store: Store, machine: CallMachine, before_ms: int) -> int:
    """What maintenance does once the log is older than retention: move every snapshot up to
    `before_ms` after T0."""
    snapshots = Snapshots(store, machine)
    retired = 0
    for shard in range(store.settings.shards):
        while (step := snapshots.advance(shard, T0 + before_ms)) is not None and step.entries:
            retired += step.retired
    return retired


def all_docs(store: Store) -> dict[str, Doc | None]:
    return store.docs.load_docs(sorted(store.docs.all_call_ids()))


def test_an_ended_call_whose_first_events_aged_out_is_kept_then_retired(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c1", "ringing", 100))
    deliver_at(store, drainer, 2_000, ended("c1", 200, "USER_END_CALL", 5))
    late = deliver_at(store, drainer, 6_000, notice("c1", "https://rec/1"))
    assert late is not None and record_of(late)["revision"] == 2
    assert age_out(store, machine, 5_000) == 0
    shard = store.keys.shard_of("c1")
    assert [e.log_id for e in store.log.read_range(shard, None, None, 10)] == [f"{T0 + 6_000}-0"]
    assert check(store, machine).differing == []
    assert rebuild(store, machine).rewritten == 0
    assert store.docs.get_doc("c1") == late
    assert age_out(store, machine, 7_000) == 1
    assert store.docs.get_doc("c1") is None
    assert check(store, machine).differing == []


def test_a_call_the_sweeper_closed_survives_its_events_aging_out(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c2", "ringing", 100))
    sweep_at(store, drainer, 5_000, "c2", before_ms=T0 + 2_000)
    swept = store.docs.get_doc("c2")
    assert swept is not None and swept["closed_by"] == "sweeper"
    age_out(store, machine, 3_000)
    assert check(store, machine).differing == []
    rebuild(store, machine)
    assert store.docs.get_doc("c2") == swept
    assert revisions(store, "c2") == [1]


def test_an_event_for_a_retired_call_never_publishes_a_second_revision_1(
    store: Store, drainer: Drainer, machine: CallMachine
) -> None:
    deliver_at(store, drainer, 1_000, event("c3", "ringing", 100))
    deliver_at(store, drainer, 2_000, ended("c3", 200, "USER_END_CALL", 5))
    assert age_out(store, machine, 3_000) == 1
    assert deliver_at(store, drainer, 4_000, ended("c3", 200, "USER_END_CALL", 5)) is None
    assert revisions(store, "c3") == [1]
    shard = store.keys.shard_of("c3")
    assert int(store.redis.hget(store.keys.verdicts(shard), "rejected:expired") or 0) == 1
    assert check(store, machine).differing == []
    # Once its tombstone's time is over, the id may start a new call.
    after = 2_000 + 2 * RETENTION_MS
    assert deliver_at(store, drainer, after, event("c3", "ringing", 300)) is not None


def test_an_ended_call_outlives_the_time_its_snapshot_retires_it(
    store: Store, drainer: Drainer
) -> None:
    """The TTL only frees memory if maintenance stops: it must never beat the retirement, which
    comes once the call's last entry is older than retention and a snapshot interval."""
    deliver_at(store, drainer, 1_000, event("c4", "ringing", 100))
    assert store.redis.pttl(store.keys.call("c4")) == -1, "an active call never expires"
    deliver_at(store, drainer, 2_000, ended("c4", 200, "USER_END_CALL", 5))
    ttl = store.redis.pttl(store.keys.call("c4"))
    retired_after_ms = RETENTION_MS + store.settings.snapshot_interval_seconds * 1000
    assert retired_after_ms < ttl <= retired_after_ms + RETENTION_MS


def test_check_on_a_live_system_ignores_the_backlog(
    deliver: Deliver, store: Store, machine: CallMachine
) -> None:
    deliver(event("c5", "ringing", 100))
    store.log.append_event("c5", body(event("c5", "answered", 150)))
    assert check(store, machine).differing == []


def test_check_reads_again_a_call_a_drainer_changed_between_its_reads(
    deliver: Deliver,
    store: Store,
    drainer: Drainer,
    machine: CallMachine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check read c6, then a drainer applied an event to it before the check read the
    cursor again: c6 must be read again at the new cursor, not reported."""
    deliver(event("c6", "ringing", 100), event("other", "ringing", 100))
    real_load = store.docs.load_packed
    reads: list[bytes | None] = []

    def read_then_a_drainer_moves_on(call_ids: list[str]) -> dict[str, bytes | None]:
        found = real_load(call_ids)
        if "c6" in call_ids:
            reads.append(found["c6"])
            if len(reads) == 1:
                _, shard, _ = store.log.append_event("c6", body(event("c6", "answered", 150)))
                drainer.drain(shard)
        return found

    monkeypatch.setattr(store.docs, "load_packed", read_then_a_drainer_moves_on)
    report = check(store, machine)
    assert len(reads) == 2 and reads[0] != reads[1], "read again after the drainer moved on"
    assert report.differing == [] and report.compared == 2


def test_rebuild_leaves_a_call_whose_history_was_trimmed_before_snapshots(
    deliver: Deliver, store: Store, machine: CallMachine
) -> None:
    doc = deliver(event("c7", "ringing", 100), ended("c7", 200, "USER_END_CALL", 5))
    shard = store.keys.shard_of("c7")
    store.redis.xtrim(store.keys.log(shard), maxlen=0)  # as versions before snapshots trimmed
    report = check(store, machine)
    assert report.differing == [] and report.left == {"c7": HISTORY_TRIMMED}
    assert rebuild(store, machine).left == {"c7": HISTORY_TRIMMED}
    assert store.docs.get_doc("c7") == doc


def test_a_drainer_that_lost_its_lock_commits_nothing_during_a_rebuild(
    deliver: Deliver,
    store: Store,
    machine: CallMachine,
    monkeypatch: pytest.MonkeyPatch,
    wake: Callable[[int], None],
) -> None:
    deliver(event("c8", "ringing", 100))
    store.redis.delete(store.keys.call("c8"))  # something for the rebuild to write
    lost_lock = Drainer(store, machine, 7, 60_000, 0, 0, wake)
    real_derive = rebuild_module.derive_shard
    attempts: list[bool] = []

    def derive_then_let_a_drainer_commit(*args: Any) -> dict[str, bytes]:
        derived = real_derive(*args)
        if not attempts:
            _, shard, _ = store.log.append_event("c8", body(ended("c8", 200, "USER_END_CALL", 5)))
            entries = store.log.read_entries(shard, store.log.cursor(shard), 10)
            attempts.append(
                lost_lock._commit(shard, "expired", store.log.cursor(shard), entries, {})
            )
        return derived

    monkeypatch.setattr(rebuild_module, "derive_shard", derive_then_let_a_drainer_commit)
    assert rebuild(store, machine).rewritten == 1
    monkeypatch.undo()
    assert attempts == [False] and revisions(store, "c8") == []
    for shard in range(store.settings.shards):
        lost_lock.drain(shard)
    assert revisions(store, "c8") == [1], "applied once, by a drainer holding the lock"
    assert check(store, machine).differing == []


def test_a_slow_rebuild_keeps_every_shard_locked_while_events_arrive(
    settings: Settings, redis: Redis, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(redis, dataclasses.replace(settings, drain_lock_seconds=1))
    drainer = Drainer(store, machine, 7, 60_000, 0, 0, lambda shard: None)
    for n in range(5):
        _, shard, _ = store.log.append_event(f"d{n}", body(event(f"d{n}", "ringing", 100)))
        drainer.drain(shard)
    real_derive = rebuild_module.derive_shard
    drained_meanwhile: list[int] = []

    def slow_derive(*args: Any) -> dict[str, bytes]:
        deadline = time.monotonic() + 2.5  # well past the 1 s lock a renewal must keep
        while time.monotonic() < deadline:
            _, shard, _ = store.log.append_event("d0", body(event("d0", "answered", 150)))
            drained_meanwhile.append(drainer.drain(shard))
            time.sleep(0.1)
        return real_derive(*args)

    monkeypatch.setattr(rebuild_module, "derive_shard", slow_derive)
    rebuild(store, machine)
    assert drained_meanwhile and set(drained_meanwhile) == {0}, "no drainer got a shard"
    monkeypatch.undo()
    for shard in range(store.settings.shards):
        drainer.drain(shard)
    doc = store.docs.get_doc("d0")
    assert doc is not None and doc["counts"]["accepted"] == 2
    assert check(store, machine).differing == []


def test_a_delivery_logged_twice_is_applied_once(deliver: Deliver, store: Store) -> None:
    deliver(event("c9", "ringing", 100), event("c9", "ringing", 100))
    deliver(ended("c9", 200, "USER_END_CALL", 5))
    doc = deliver(notice("c9", "https://rec/9"), notice("c9", "https://rec/9"))
    assert doc["counts"] == {"accepted": 2, "duplicate": 2, "rejected": 0, "annotation": 1}
    assert revisions(store, "c9") == [1, 2]


def test_a_lock_renewal_landing_during_a_shards_rewrite_does_not_fail_it(
    deliver: Deliver, store: Store, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rebuild's renewer keeps every lock alive while the shards are rewritten; a renewal
    between a rewrite's check of its lock and its writes (a WATCHed key written) made a long
    rebuild fail for nothing (seen with 200,000 calls)."""
    deliver(event("c10", "ringing", 100))
    store.redis.delete(store.keys.call("c10"))
    real_set_doc = store.docs._set_doc
    renewed: list[bool] = []

    def set_doc_as_a_renewal_lands(pipe: Any, doc: Any, packed: bytes) -> None:
        shard = store.keys.shard_of(doc["call_id"])
        token = store.redis.get(store.keys.drain_lock(shard))
        assert token is not None
        renewed.append(store.coordination.locks.renew(shard, text(token)))
        real_set_doc(pipe, doc, packed)

    monkeypatch.setattr(store.docs, "_set_doc", set_doc_as_a_renewal_lands)
    assert rebuild(store, machine).rewritten == 1
    assert renewed == [True]
    assert check(store, machine).differing == []


def test_a_rebuild_that_loses_a_later_shards_lock_keeps_what_it_wrote_before(
    deliver: Deliver, store: Store, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each shard is rewritten by its own commit script (a cluster runs a script in one slot),
    no longer all in one transaction: a lock lost at a later shard stops the rebuild there,
    the earlier shards' rewrites stay (each whole and correct on its own), and a second run
    finishes the rest."""
    by_shard = {store.keys.shard_of(f"c2{n}"): f"c2{n}" for n in range(99)}
    first, later = by_shard[0], by_shard[store.settings.shards - 1]
    for call_id in (first, later):
        deliver(event(call_id, "ringing", 100))
        store.redis.delete(store.keys.call(call_id))
    lost = store.keys.shard_of(later)
    real_rewrite = store.docs.rewrite

    def losing_the_later_lock(token: str, shard: int, *rest: Any) -> bool:
        if shard == lost:
            store.redis.delete(store.keys.drain_lock(shard))  # expired, say, and taken back
        return real_rewrite(token, shard, *rest)

    monkeypatch.setattr(store.docs, "rewrite", losing_the_later_lock)
    with pytest.raises(RuntimeError, match=f"shard {lost}'s lock or cursor moved"):
        rebuild(store, machine)
    monkeypatch.undo()
    assert store.docs.get_doc(first) is not None and store.docs.get_doc(later) is None
    assert rebuild(store, machine).rewritten == 1
    assert check(store, machine).differing == []
