"""Rebuild: the log alone reproduces every call's state, journal and record."""

from __future__ import annotations

import json
from collections.abc import Callable

from callstate.calls import Doc
from callstate.machine import CallMachine
from callstate.rebuild import NOT_IN_LOG, check, rebuild
from callstate.store import Store
from tests.factories import ended, event

Deliver = Callable[..., Doc]


def snapshot(store: Store) -> dict[str, Doc | None]:
    return store.docs.load_docs(sorted(store.docs.all_call_ids()))


def test_rebuild_reproduces_what_the_drainer_produced(
    deliver: Deliver, store: Store, machine: CallMachine
) -> None:
    for n in range(12):
        call = f"call-{n}"
        deliver(
            event(call, "ringing", 100, to={"number": f"agent-{n}"}),
            event(call, "ringing", 100),
            event(call, "answered", 90),
            event(call, "answered", 120),
            *([ended(call, 200, "USER_END_CALL", 80)] if n % 3 else []),
        )
    before = snapshot(store)
    active_before = store.docs.active_calls(None, None, 0, 100)
    assert check(store, machine, 5).differing == []
    store.redis.delete(store.keys.call("call-1"))
    store.redis.set(store.keys.call("call-2"), json.dumps({"corrupt": True}))
    store.redis.delete(*(store.keys.active(shard) for shard in range(store.keys.shards)))
    store.redis.set(store.keys.call("ghost"), "{}")
    report = check(store, machine, 5)
    assert set(report.differing) == {"call-1", "call-2"}
    assert report.left == {"ghost": NOT_IN_LOG}, "never removed: left, and said why"
    rebuild(store, machine, batch=5)
    assert snapshot(store) == before | {"ghost": {}}
    assert store.docs.active_calls(None, None, 0, 100) == active_before
    assert not any(store.log.has_backlog(shard) for shard in range(store.settings.shards))


def test_rebuild_waits_for_a_busy_shard(store: Store, machine: CallMachine) -> None:
    store.coordination.locks.acquire(1, "worker")
    try:
        rebuild(store, machine, batch=5)
    except RuntimeError as exc:
        assert "shard 1" in str(exc)
    else:
        raise AssertionError("rebuild ran while a shard was being drained")
    assert store.redis.get(store.keys.drain_lock(0)) is None
