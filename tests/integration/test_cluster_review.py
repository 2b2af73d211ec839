"""What a hostile review found on Redis Cluster (CALLSTATE_REDIS_CLUSTER_NODES): each test
failed on the version it names, with real servers."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest
from redis.exceptions import RedisError

from callstate.calls import Doc
from callstate.config import Settings
from callstate.connection import connect, connect_queue, server_of
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.snapshots import Snapshots
from callstate.store import Store
from tests.factories import body, event
from tests.integration.ha import ClusterSet
from tests.integration.stack import Stack
from tests.unit.test_isolation import POISON, SHARD, ids_in_shard, log_raw

pytestmark = pytest.mark.ha
MakeStack = Callable[..., Stack]


def test_a_refused_delivery_is_answered_and_quarantined_on_a_cluster(
    make_cluster_stack: MakeStack,
) -> None:
    """The quarantine's list and its counter are global keys, in two hash slots: written in one
    MULTI, the cluster client refused them (CrossSlotTransactionError), so every refused
    delivery was answered 500 instead of its 4xx, and quarantined nowhere (67c0361)."""
    stack = make_cluster_stack()
    stack.start_web(1)
    invalid = stack.post_raw(b'{"call_id": "q-1", "call_status": ')
    assert invalid.status_code == 400, invalid.text
    unnamed = stack.post({"call_status": "ringing", "timestamp_ms": 1})
    assert unnamed.status_code == 422, unnamed.text
    shown = stack.cli("quarantine")
    assert shown.returncode == 0, shown.stderr
    assert "invalid_json" in shown.stdout and "call_id" in shown.stdout, shown.stdout
    assert stack.post(event("q-2", "ringing", 1)).status_code == 200


def test_an_unprocessable_entry_is_set_aside_and_quarantined_on_a_cluster(
    cluster: ClusterSet,
) -> None:
    """The drainer quarantines an entry it sets aside after its commit: on a cluster that
    quarantine raised, failing the drain job (its shard then waited for maintenance) and
    losing the operator's view of the entry (67c0361)."""
    settings = Settings.from_env({**cluster.env, "CALLSTATE_SHARDS": "16"})
    redis = connect(settings)
    store = Store(redis, settings, connect_queue(settings, redis))
    woken: list[int] = []
    drainer = Drainer(
        store, CallMachine(), batch=7, slice_ms=60_000, linger_ms=0, window_ms=0, wake=woken.append
    )
    poisoned, after = ids_in_shard(store, "poison", 2)
    aside = log_raw(store, poisoned, POISON["AttributeError"] % poisoned.encode())
    log_raw(store, after, body(event(after, "ringing", 1)))

    drainer.drain(SHARD)

    assert not store.log.has_backlog(SHARD)
    doc = store.docs.get_doc(after)
    assert doc is not None and doc["status"] == "ringing"
    [item] = store.quarantine.recent(5)
    assert (item["error"], item["log_id"], item["call_id"]) == ("unprocessable", aside, poisoned)


def test_a_snapshot_step_whose_connection_breaks_keeps_its_fence_on_a_cluster(
    cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot step writes only while its WATCH holds (cursor, position, lock). redis-py's
    cluster client, on a broken connection or a timeout, sends MULTI/EXEC again on a new
    connection without the WATCH: a drainer's commit meanwhile was written over (the position
    moved past entries the new cursor had not folded, and the log trimmed to it)."""
    settings = Settings.from_env({**cluster.env, "CALLSTATE_SHARDS": "16"})
    redis = connect(settings)
    store = Store(redis, settings, connect_queue(settings, redis))
    keys, shard, token = store.keys, 3, "snapshot-step"
    redis.set(keys.drain_lock(shard), token)
    redis.set(keys.cursor(shard), "5-0")
    node = server_of(redis, keys.cursor(shard))

    def interfere(_self: Snapshots, pipe: object, shard: int, doc: object) -> None:
        # Between the step's WATCH and its EXEC: the cursor moves, the connection breaks.
        redis.set(keys.cursor(shard), "6-0")
        node.client_kill_filter(_type="normal", skipme=True)

    monkeypatch.setattr(Snapshots, "_retire", interfere)
    snapshots = Snapshots(store, CallMachine())
    try:
        written = snapshots._commit(shard, token, None, "5-0", "5-0", {"gone": cast(Doc, {})}, {})
    except RedisError:
        written = False  # refused outright is as good as refused by the fence
    assert not written
    assert snapshots.position(shard) is None


def test_the_webhook_and_readyz_answer_503_when_no_cluster_node_answers(
    make_cluster_stack: MakeStack, cluster: ClusterSet
) -> None:
    """ "Redis down: 503, deliver it again." With every node of the cluster gone, redis-py's
    cluster client raises RedisClusterException, which is not a RedisError: the webhook
    answered 500 and /readyz crashed with a 500 instead of saying what fails."""
    stack = make_cluster_stack()
    stack.start_web(1)
    assert stack.post(event("down-1", "ringing", 1)).status_code == 200
    for node in cluster.nodes:
        node.kill()

    answer = stack.post(event("down-1", "answered", 2))
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"] == "unavailable"
    ready = stack.get("/readyz")
    assert ready.status_code == 503, ready.text
    assert "redis" in ready.json()["failing"]
