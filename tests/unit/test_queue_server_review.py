"""Review of CALLSTATE_QUEUE_URL (issue 13, part 1): what the split between the data Redis and
the queue's Redis leaves behind, on two fakeredis servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from callstate.config import Settings
from callstate.forwarding import Forwarder
from callstate.machine import CallMachine
from callstate.migration import NotMigratedError, move_deliveries
from callstate.web import create_app
from tests.factories import body, event
from tests.receiver import FAIL, OK, Receiver
from tests.unit.test_forwarding import SECRET, Pipeline, a_call, forwarding_settings

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(SECRET) as running:
        yield running


def second_server() -> Redis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def delivered_in_order(ids: list[str], call_id: str, last: int) -> bool:
    """Whether revision `last` of the call, if delivered, came after every revision before it."""
    ours = [i for i in ids if i.startswith(f"{call_id}:")]
    if f"{call_id}:{last}" not in ours:
        return True
    return ours[: ours.index(f"{call_id}:{last}")] == [f"{call_id}:{n}" for n in range(1, last)]


def test_setting_a_queue_url_on_a_running_deployment_keeps_each_calls_order(
    redis: Redis, tmp_path: Path, machine: CallMachine, receiver: Receiver
) -> None:
    """An upgrade: revision 1 of a call waits in a delivery job (its receiver failed) while RQ
    shares the data Redis; the deployment then restarts with CALLSTATE_QUEUE_URL. It refuses to
    start, and migrate-keys moves nothing, until the old set-up has delivered revision 1; then
    revision 2 follows it."""
    receiver.behaviour = lambda n: FAIL if n == 0 else OK
    settings = forwarding_settings(tmp_path, receiver.url)
    before = Pipeline(redis, settings, machine)
    shard = before.apply(*a_call("upgrade-1"))
    before.forwarder.forward(shard)
    [job_id] = before.pending_jobs(shard)  # revision 1, in a job on the data Redis

    queue = second_server()
    with pytest.raises(NotMigratedError, match="migrate-keys"):
        create_app(settings, redis, queue)
    assert move_deliveries(redis, queue, before.store.keys) is None
    before.forwarder.deliver(shard, 1, job_id, 0)  # the old set-up's retrier
    assert receiver.accepted.ids == ["upgrade-1:1"]
    assert move_deliveries(redis, queue, before.store.keys) == 1  # the counts
    create_app(settings, redis, queue)

    after = Pipeline(redis, settings, machine, queue)
    after.apply({"type": "recording", "call_id": "upgrade-1", "recording_url": "https://r/1"})
    after.forwarder.forward(shard)
    assert receiver.accepted.ids == ["upgrade-1:1", "upgrade-1:2"]
    assert after.counters(shard) == {"delivered": 2, "failed": 1}


def test_dead_letters_kept_before_a_queue_url_was_set_can_still_be_redelivered(
    redis: Redis, tmp_path: Path, machine: CallMachine, receiver: Receiver
) -> None:
    """A dead letter kept while RQ shared the data Redis is moved by migrate-keys, then counted
    and redelivered once the queues are on a server of their own."""
    receiver.behaviour = lambda n: FAIL
    settings = forwarding_settings(tmp_path, receiver.url)
    before = Pipeline(redis, settings, machine)
    shard = before.apply(*a_call("letter-1"))
    before.forwarder.forward(shard)
    [job_id] = before.pending_jobs(shard)
    before.forwarder.deliver(shard, 1, job_id, 1)  # the last attempt: a dead letter
    assert redis.llen(before.store.keys.dead_letters(shard)) == 1

    queue = second_server()
    assert move_deliveries(redis, queue, before.store.keys) == 2  # the letters and the counts
    receiver.behaviour = lambda n: OK
    after = Forwarder(redis, settings, queue)
    assert after.redeliver() == (1, 0)
    assert redis.exists(before.store.keys.dead_letters(shard)) == 0


@pytest.mark.xfail(
    strict=True,
    reason="known limit (README): a queue's Redis that loses its data loses the deliveries "
    "waiting in its jobs; it must be as durable as the data Redis",
)
def test_a_queue_server_restarted_empty_keeps_each_calls_order(
    redis: Redis, tmp_path: Path, machine: CallMachine, receiver: Receiver
) -> None:
    """Revision 1 waits in a delivery job when the queue's server comes back empty (no
    append-only file, a new machine): revision 2 must not overtake it, and revision 1 must
    still be delivered or dead-lettered. The data Redis kept everything."""
    receiver.behaviour = lambda n: FAIL if n == 0 else OK
    queue = second_server()
    pipe = Pipeline(redis, forwarding_settings(tmp_path, receiver.url), machine, queue)
    shard = pipe.apply(*a_call("empty-1"))
    pipe.forwarder.forward(shard)
    assert len(pipe.pending_jobs(shard)) == 1

    queue.flushall()
    pipe.forwarder.failing_until.clear()
    pipe.apply({"type": "recording", "call_id": "empty-1", "recording_url": "https://r/1"})
    pipe.forwarder.forward(shard)
    assert delivered_in_order(receiver.accepted.ids, "empty-1", 2), receiver.accepted.ids


def test_metrics_keep_the_data_figures_while_only_the_queue_server_is_down(
    redis: Redis, tmp_path: Path
) -> None:
    """The backlog is what tells an operator that events pile up while the queue's server is
    away; the data Redis answers, so its figures stay, and `callstate_redis_up` says 1."""
    settings = Settings(redis_url="redis://fake", embedded_redis=False, var_dir=tmp_path)
    queue_server = fakeredis.FakeServer()
    client = create_app(settings, redis, fakeredis.FakeRedis(server=queue_server)).test_client()
    queue_server.connected = False
    answer = client.post(
        "/webhooks/stringee", data=body(event("metric-q", "ringing", 1000)), headers=JSON
    )
    assert answer.status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["callstate_redis_up"].samples[0].value == 1
    assert "callstate_backlog_entries" in families
    assert sum(s.value for s in families["callstate_backlog_entries"].samples) == 1
