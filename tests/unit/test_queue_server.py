"""RQ's queues on a Redis of their own (CALLSTATE_QUEUE_URL): the settings, the client, and
wake-ups that a lost or doubled enqueue on the queue's server cannot turn into a lost or twice
applied event."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any
from unittest.mock import patch

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis import Redis

from callstate import coordination, drain, jobs
from callstate.config import Settings
from callstate.connection import connect, connect_queue
from callstate.coordination import new_wake_id
from tests.factories import body, event
from tests.unit.test_wake import CALLS, JSON, InlineThreads, World

BASE = {"REDIS_URL": "redis://127.0.0.1:6400/0"}


def test_unset_the_queues_share_the_data_client() -> None:
    found = Settings.from_env(BASE)
    assert found.queue_url is None and found.queue_sentinel_master is None
    data = connect(found)
    assert connect_queue(found, data) is data


def test_a_queue_url_gets_a_client_of_its_own() -> None:
    found = Settings.from_env({**BASE, "CALLSTATE_QUEUE_URL": "redis://127.0.0.1:6401/2"})
    data = connect(found)
    queue = connect_queue(found, data)
    assert queue is not data
    options = queue.connection_pool.connection_kwargs
    assert (options["port"], options["db"]) == (6401, 2)
    assert options["socket_timeout"] == data.connection_pool.connection_kwargs["socket_timeout"]


def test_a_queue_primary_is_found_through_the_same_sentinels() -> None:
    env = {
        "REDIS_SENTINELS": "127.0.0.1:26379,127.0.0.1:26380",
        "REDIS_SENTINEL_MASTER": "data",
        "CALLSTATE_QUEUE_SENTINEL_MASTER": "queues",
    }
    found = Settings.from_env(env)
    queue = connect_queue(found, connect(found))
    pool: Any = queue.connection_pool
    assert pool.service_name == "queues"
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CALLSTATE_QUEUE_URL": "127.0.0.1:6401"}, "redis://"),
        ({"CALLSTATE_QUEUE_SENTINEL_MASTER": "queues"}, "REDIS_SENTINELS too"),
        (
            {"CALLSTATE_QUEUE_URL": "redis://q:6379", "CALLSTATE_QUEUE_SENTINEL_MASTER": "queues"},
            "not both",
        ),
    ],
)
def test_settings_refuse_a_queue_server_they_cannot_use(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env({**BASE, **env})


class TwoServers(World):
    """The world of test_wake with RQ's queue on a second fakeredis server, which can be taken
    down (commands then fail as on a refused connection)."""

    def __init__(self, settings: Settings, shards_per_job: int) -> None:
        self.queue_server = fakeredis.FakeServer()
        data = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        super().__init__(
            settings, data, shards_per_job, fakeredis.FakeRedis(server=self.queue_server)
        )

    def post_while_the_queue_is_down(self, call_id: str) -> None:
        """The event is logged and acknowledged; its drain job, if it claimed one, is lost."""
        self.queue_server.connected = False
        try:
            self.post(call_id)
        finally:
            self.queue_server.connected = True

    def wake_twice(self, call_id: str, same_id: bool) -> None:
        """A doubled wake-up: the drain job its shard's flag names queued again (an enqueue
        retried after a timeout that had gone through), or one more job of a new id."""
        shard = self.store.keys.shard_of(call_id)
        holder = self.store.coordination.wakes.holder(shard)
        wake_id = holder if same_id and holder is not None else new_wake_id()
        jobs.enqueue_drain(self.context.queue, shard, 60, wake_id)

    def act(self, action: tuple[str, int]) -> None:
        kind, n = action
        call_id = CALLS[n % len(CALLS)]
        if kind == "lose":
            self.post_while_the_queue_is_down(call_id)
        elif kind == "double":
            self.wake_twice(call_id, same_id=n % 2 == 0)
        else:
            super().act(action)


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["post", "post", "lose", "double", "maintain", "run"]),
            st.integers(0, 5),
        ),
        max_size=40,
    ),
    slice_ms=st.sampled_from([0, 60_000]),
    shards_per_job=st.sampled_from([1, 3]),
)
def test_lost_and_doubled_wake_ups_on_a_queue_of_its_own_apply_every_event_once(
    steps: list[tuple[str, int]], slice_ms: int, shards_per_job: int
) -> None:
    """Whatever the order: once maintenance has run (its grace for lost wakes over) and the
    queue is worked off, every acknowledged event is applied, and each one once."""
    base = Settings(redis_url="redis://fake", embedded_redis=False, var_dir=Path("var"), shards=3)
    tuned = dataclasses.replace(base, drain_slice_ms=slice_ms, drain_linger_ms=0, drain_batch=2)
    with patch.object(drain, "ThreadPoolExecutor", InlineThreads):
        w = TwoServers(tuned, shards_per_job)
        for action in steps:
            w.act(action)
        with patch.object(coordination, "LOST_WAKE_GRACE_MS", 0):
            jobs.maintain()
        for _ in range(200):
            if not w.run_one_job():
                break
    shards = range(tuned.shards)
    assert not any(w.store.log.has_backlog(shard) for shard in shards)
    assert w.store.docs.applied_count() == w.sent
    applied = sum(int(w.store.redis.get(w.store.keys.applied_counter(s)) or 0) for s in shards)
    assert applied == w.sent


def test_an_event_posted_while_the_queue_is_down_is_acknowledged_then_applied(
    tmp_path: Path,
) -> None:
    """The event is stored on the data Redis, so it is acknowledged; `/readyz` names the queue's
    Redis; maintenance queues the lost drain once the queue is back."""
    w = TwoServers(Settings(redis_url="redis://fake", embedded_redis=False, var_dir=tmp_path), 0)
    w.queue_server.connected = False
    answer = w.client.post(
        "/webhooks/stringee", data=body(event("down-1", "ringing", 1000)), headers=JSON
    )
    ready = w.client.get("/readyz")
    w.queue_server.connected = True
    assert answer.status_code == 200 and answer.get_json()["status"] == "stored"
    assert ready.status_code == 503
    assert ready.get_json()["failing"] == ["queue", "workers"]
    assert ready.get_json()["checks"]["redis"] == {"ok": True}
    assert w.context.queue.count == 0
    with patch.object(coordination, "LOST_WAKE_GRACE_MS", 0):
        assert jobs.maintain()["woken"] == 1
    assert w.run_one_job()
    assert w.store.docs.get_doc("down-1") is not None
    assert w.store.docs.applied_count() == 1


def test_nothing_of_rq_is_written_to_the_data_redis(tmp_path: Path) -> None:
    w = TwoServers(Settings(redis_url="redis://fake", embedded_redis=False, var_dir=tmp_path), 0)
    for call_id in CALLS:
        w.post(call_id)
    while w.run_one_job():
        pass
    data: Redis = w.store.redis
    assert w.store.docs.applied_count() == len(CALLS)
    assert data.keys("rq:*") == []
    assert w.store.queue_redis.keys("rq:*")
    assert w.store.queue_redis.keys("cs:*") == []
