"""Documents: the rebuild's fenced rewrite of documents and active-call indexes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from callstate.calls import Doc
from callstate.machine import CallMachine
from callstate.rebuild import rebuild
from callstate.store import Store
from tests.factories import ended, event

Deliver = Callable[..., Doc]


def test_a_rebuild_drops_index_entries_no_active_call_accounts_for(
    deliver: Deliver, store: Store, machine: CallMachine
) -> None:
    deliver(event("live", "ringing", 100), event("gone", "ringing", 100))
    deliver(ended("gone", 200, "USER_END_CALL", 5))
    shard = store.keys.shard_of("gone")
    stale = store.keys.active_by(shard, "number", "84909985668")
    store.redis.zadd(stale, {"gone": 1})
    store.redis.zadd(store.keys.active_by(shard, "user", "nobody"), {"gone": 1})
    rebuild(store, machine)
    live = store.keys.active_by(store.keys.shard_of("live"), "number", "84909985668")
    assert store.redis.zrange(live, 0, -1) == [b"live"]
    assert store.redis.zrange(stale, 0, -1) == ([b"live"] if stale == live else [])
    assert not store.redis.exists(store.keys.active_by(shard, "user", "nobody"))


def test_a_write_between_the_rebuilds_watch_and_exec_cancels_it(
    deliver: Deliver, store: Store, machine: CallMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = deliver(event("c1", "ringing", 100))
    store.redis.delete(store.keys.call("c1"))
    shard = store.keys.shard_of("c1")
    real_set_doc = store.docs._set_doc

    def a_drainer_commits_meanwhile(*args: Any) -> None:
        store.redis.set(store.keys.cursor(shard), "9999999999999-0")  # another connection
        real_set_doc(*args)

    monkeypatch.setattr(store.docs, "_set_doc", a_drainer_commits_meanwhile)
    with pytest.raises(RuntimeError, match="nothing written"):
        rebuild(store, machine)
    assert store.docs.get_doc("c1") is None
    monkeypatch.undo()
    store.redis.set(store.keys.cursor(shard), doc["journal"][-1]["log_id"])
    rebuild(store, machine)
    assert store.docs.get_doc("c1") == doc
