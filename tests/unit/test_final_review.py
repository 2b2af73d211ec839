"""Review of what changed after the first two reviews of issue 13: the web's layout check made
at its requests, moving the deliveries with a per-shard marker, the metrics split between the
two servers, and the reads that merge the shards' ordered replies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fakeredis
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from callstate import connection, recordstream
from callstate.config import Settings
from callstate.connection import connect_queue
from callstate.keys import Keys
from callstate.migration import move_deliveries, unmigrated
from callstate.store import Store
from callstate.web import create_app
from tests.factories import body, event
from tests.unit.test_migration_breaks import web_started_while_redis_away

JSON = {"Content-Type": "application/json"}
KEYS = Keys("cs", 4)


@pytest.fixture
def old_settings(tmp_path: Path) -> Settings:
    return Settings(redis_url="redis://fake", embedded_redis=False, var_dir=tmp_path, shards=4)


def test_a_request_whose_layout_check_meets_redis_away_stores_nothing_beside_an_old_store(
    old_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`checked_first` lets a request through when its check meets a Redis that does not
    answer, trusting the request to meet it too. Redis that answers again in between (a restart
    finishing, a timeout under load, a failover) takes the event into `cs:{sN}:log` beside the
    old `cs:log:N`: the case the check exists for, and migrate-keys then finds the log's new name
    taken."""
    redis, client = web_started_while_redis_away(old_settings)
    real_exists = redis.exists
    flapped: list[bool] = []

    def flapping(*names: Any) -> Any:
        if not flapped:
            flapped.append(True)
            raise RedisConnectionError("Connection reset by peer")
        return real_exists(*names)

    monkeypatch.setattr(redis, "exists", flapping)
    answer = client.post(
        "/webhooks/stringee", data=body(event("late-1", "ringing", 1000)), headers=JSON
    )
    assert flapped, "the check met Redis away"
    assert answer.status_code == 503
    assert not real_exists(KEYS.log(KEYS.shard_of("late-1")))


def test_a_queue_url_naming_the_data_redis_keeps_the_dead_letters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CALLSTATE_QUEUE_URL is documented as defaulting to the data Redis, so setting it to
    REDIS_URL should change nothing. It gets a second client of the same server, which
    everything that asks `queue_redis is redis` takes for another server: the web refuses to
    start on the store's own dead letters (DELIVERIES_MESSAGE), and the migrate-keys it sends
    the operator to appends them to themselves, then deletes them all, counts included."""
    url = "redis://10.0.0.5:6379/0"
    settings = Settings(
        redis_url=url, queue_url=url, embedded_redis=False, var_dir=tmp_path, shards=4
    )
    server = fakeredis.FakeServer()
    monkeypatch.setattr(connection, "connect_url", lambda url: fakeredis.FakeRedis(server=server))
    data = fakeredis.FakeRedis(server=server)
    data.lpush(KEYS.dead_letters(1), b'{"id": "job-1"}')
    data.hset(KEYS.forward_counters(1), mapping={"delivered": 5, "dead_lettered": 1})

    queue = connect_queue(settings, data)
    assert unmigrated(data, queue, KEYS) is None
    create_app(settings, data)
    move_deliveries(data, queue, KEYS)
    assert data.lrange(KEYS.dead_letters(1), 0, -1) == [b'{"id": "job-1"}']
    assert data.hgetall(KEYS.forward_counters(1)) == {b"delivered": b"5", b"dead_lettered": b"1"}


def test_following_the_records_keeps_their_append_order_across_shards(redis: Redis) -> None:
    """`after` reads every shard's stream with one XREAD, whose COUNT holds per stream: a shard
    cut at `count` may hold records older than another shard's returned, and those come in the
    next call, after them (`callstate records --follow` prints them out of order). Only what
    precedes every cut is in order."""
    first, second = 0, 1
    for millis in (1, 2, 3):
        redis.xadd(KEYS.records(first), {"call_id": f"a-{millis}"}, id=f"{millis}-0")
    redis.xadd(KEYS.records(second), {"call_id": "b-2"}, id="2-5")
    seen = recordstream.positions(KEYS, "0-0")

    followed: list[str] = []
    while batch := recordstream.after(redis, KEYS, seen, block_ms=1, count=1):
        followed += [row.entry_id for row in batch]
    assert followed == ["1-0", "2-0", "2-5", "3-0"]


def test_the_outbox_still_shows_while_only_the_queues_redis_is_down(
    tmp_path: Path, redis: Redis
) -> None:
    """The outbox (revisions committed, not yet handed to the forwarder) lives on the data Redis
    and is what piles up while the queue's server is down, the forwarder's jobs with it; the
    scrape drops it with the queue's figures."""
    settings = Settings(
        redis_url="redis://fake",
        embedded_redis=False,
        var_dir=tmp_path,
        shards=4,
        record_webhook_urls=("https://receiver.example/records",),
        record_webhook_secret="s" * 32,
    )
    queue_server = fakeredis.FakeServer()
    queue = fakeredis.FakeRedis(server=queue_server)
    redis.xadd(KEYS.outbox(2), {"call_id": "c-1"})
    client = create_app(settings, redis, queue).test_client()
    queue_server.connected = False

    scraped = client.get("/metrics").get_data(as_text=True)
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
    }
    assert values["callstate_queue_up"] == 0
    assert values.get("callstate_record_outbox_entries") == 1


def test_a_page_of_active_calls_past_the_end_reads_no_call(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each shard's first `offset + limit` calls are read to merge them: a page past the end
    (`offset` up to 10^9 is accepted) reads every active call of every shard and walks them in
    Python, where the one sorted set before read none (ZREVRANGE from the offset)."""
    for n in range(40):
        shard = store.keys.shard_of(f"c-{n}")
        store.redis.zadd(store.keys.active(shard), {f"c-{n}": 1000 + n})
    read: list[int] = []
    real_pipeline = store.redis.pipeline

    def counting(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        execute = pipe.execute

        def counted(*a: Any, **k: Any) -> Any:
            replies = execute(*a, **k)
            read.extend(len(reply) for reply in replies if isinstance(reply, list))
            return replies

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    monkeypatch.setattr(store.redis, "pipeline", counting)
    total, docs = store.docs.active_calls(None, None, 1_000_000, 50)
    assert (total, docs) == (40, [])
    assert sum(read) == 0, "members read for an empty page"


def test_a_move_resumed_after_the_old_set_up_ran_again_keeps_what_it_wrote_since(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between the queue's transaction and clearing the data side, a move leaves its
    marker; the store is refused with the new setting, and the message says to run without it
    meanwhile. Run so, the old set-up dead-letters another delivery on the data Redis; the next
    move sees the marker, takes the shard for moved and deletes that letter and count unmoved."""
    queue = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    redis.lpush(KEYS.dead_letters(1), b'{"id": "job-1"}')
    redis.hset(KEYS.forward_counters(1), mapping={"dead_lettered": 1})
    real_evalsha = redis.evalsha

    def killed(*args: Any) -> Any:
        if KEYS.dead_letters(1) in args:  # the data side's clearing
            raise KeyboardInterrupt
        return real_evalsha(*args)

    monkeypatch.setattr(redis, "evalsha", killed)
    with pytest.raises(KeyboardInterrupt):
        move_deliveries(redis, queue, KEYS)
    monkeypatch.setattr(redis, "evalsha", real_evalsha)

    redis.lpush(KEYS.dead_letters(1), b'{"id": "job-2"}')  # the old set-up, run again
    redis.hincrby(KEYS.forward_counters(1), "dead_lettered", 1)
    move_deliveries(redis, queue, KEYS)
    letters = queue.lrange(KEYS.dead_letters(1), 0, -1)
    assert sorted(letters) == [b'{"id": "job-1"}', b'{"id": "job-2"}']
    assert queue.hgetall(KEYS.forward_counters(1)) == {b"dead_lettered": b"2"}


def test_a_queue_primary_naming_the_data_primary_shares_its_client() -> None:
    env = {
        "REDIS_SENTINELS": "127.0.0.1:26379",
        "REDIS_SENTINEL_MASTER": "data",
        "CALLSTATE_QUEUE_SENTINEL_MASTER": "data",
    }
    found = Settings.from_env(env)
    data = connection.connect(found)
    assert connect_queue(found, data) is data
