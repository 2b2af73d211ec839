"""Review of the hash-tag layout change and `callstate migrate-keys` (issue 13, parts 4 and 5):
a run killed halfway, the refusal's blind spots, and key names that look like others."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from flask.testing import FlaskClient
from redis import Redis
from rq import Queue, Worker

from callstate import cli, migration, recordstream
from callstate.config import Settings
from callstate.keys import Keys
from callstate.migration import migrate, move_deliveries, unmigrated
from callstate.store import Store
from callstate.web import create_app
from tests.factories import b64, body, event, load_old_store

JSON = {"Content-Type": "application/json"}
KEYS = Keys("cs", 4)
# What the refusal looks at (`old_layout_present`).
MARKERS = {f"cs:{name}:{shard}" for name in ("log", "cursor") for shard in range(4)} | {
    "cs:active",
    "cs:records",
}


@pytest.fixture
def old_settings(tmp_path: Path) -> Settings:
    return Settings(redis_url="redis://fake", embedded_redis=False, var_dir=tmp_path, shards=4)


def killed_at(redis: Redis, method: str, when: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `redis.<method>` raise as a killed process would stop, the first time `when` holds
    for its arguments; it works again after."""
    real = getattr(redis, method)
    fired: list[bool] = []

    def dying(*args: Any, **kwargs: Any) -> Any:
        if not fired and when(*args, **kwargs):
            fired.append(True)
            raise KeyboardInterrupt  # what SIGINT does; SIGKILL stops at the same point
        return real(*args, **kwargs)

    monkeypatch.setattr(redis, method, dying)


def old_records(fixture: dict[str, Any]) -> list[tuple[str, dict[bytes, bytes]]]:
    items = {b64(k).decode(): item for k, item in fixture["keys"].items()}
    return [
        (entry_id, {b64(k): b64(v) for k, v in fields.items()})
        for entry_id, fields in items["cs:records"]["value"]
    ]


def test_a_second_run_finishes_a_records_split_killed_halfway(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README: a run killed halfway is finished by running it again. A run killed while it
    splits `cs:records` has copied some entries to the shards' streams; the next run copies
    them again from the start with their ids, and XADD refuses an id not above the stream's
    last ("ID equal or smaller"): every later run fails the same way, and the service refuses
    to start while `cs:records` is there."""
    fixture = load_old_store(redis)
    expected = old_records(fixture)
    assert len(expected) > 3
    monkeypatch.setattr(migration, "SPLIT_BATCH", 3)
    calls: list[str] = []

    def second_batch(key: Any, *args: Any, **kwargs: Any) -> bool:
        calls.append(key)
        return calls.count("cs:records") == 2

    killed_at(redis, "xrange", second_batch, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        migrate(redis, KEYS)
    assert redis.exists("cs:records"), "killed during the split"

    migrate(redis, KEYS)
    moved = [(r.entry_id, r.fields) for r in recordstream.every(redis, KEYS)]
    assert sorted(moved) == sorted(expected), "every record once, with its id"
    assert unmigrated(redis, redis, KEYS) is None


def test_a_run_killed_after_the_logs_moved_leaves_the_store_refused(
    redis: Redis, old_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal looks only at the logs, cursors, `cs:active` and `cs:records`, and a run
    moves keys in SCAN order, which is the hash table's: on a store of thousands of calls the
    last of those ten keys comes well before the end (on a real Redis, with the fixture, only
    `cs:stats:applied:0` came after it). Killed there, the run leaves call documents, tombstones,
    indexes and history under their old names, and the web, the workers and the CLI start:
    those calls are invisible, a new event of one of them starts a new document, and the next
    migrate-keys run finds that name taken (a conflict, the old document never moved)."""
    load_old_store(redis)
    real_scan = redis.scan_iter

    def markers_first(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        found = sorted(real_scan(*args, **kwargs), key=lambda k: k.decode() not in MARKERS)
        return iter(found)

    monkeypatch.setattr(redis, "scan_iter", markers_first)
    killed_at(redis, "renamenx", lambda src, dst: src == "cs:call:old-3", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        migrate(redis, KEYS)
    assert redis.exists("cs:call:old-3"), "killed before this call moved"

    assert unmigrated(redis, redis, KEYS) is not None, "the store is refused until it is done"

    migrate(redis, KEYS)
    assert unmigrated(redis, redis, KEYS) is None
    assert Store(redis, old_settings).docs.get_doc("old-3") is not None


def test_a_web_started_while_redis_was_away_still_refuses_an_old_store(
    old_settings: Settings,
) -> None:
    """`refuse_unmigrated` lets a web start whose Redis does not answer yet (it answers 503),
    and nothing checks again once Redis answers: a web started with Redis restarting (LOADING
    a large store, or `make run` starting both) takes events into `cs:{sN}:log` beside the old
    `cs:log:N`, and `migrate-keys` then cannot rename the old log (its new name exists)."""
    redis, client = web_started_while_redis_away(old_settings)

    answer = client.post(
        "/webhooks/stringee", data=body(event("late-1", "ringing", 1000)), headers=JSON
    )
    assert answer.status_code == 503
    assert not redis.exists(KEYS.log(KEYS.shard_of("late-1")))


@pytest.mark.parametrize("queue_name", ["callstate-records", "callstate-records-retries"])
def test_migrate_keys_refuses_while_a_records_worker_runs(
    redis: Redis,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """migrate-keys counts only the workers of the events queue. An old forwarder or retrier
    still running during it runs delivery jobs against the old names: once
    `cs:forward-pending:N` is renamed, a delivery job finds no pending delivery and ends
    without sending (the revision is never delivered), and its FINISH script writes
    `cs:stats:forwarding:N` and `cs:dead-letters:N` again under the old names, which nothing
    refuses and nothing reads."""
    load_old_store(redis)
    worker = Worker([Queue(queue_name, connection=redis)], connection=redis)
    worker.register_birth()  # type: ignore[no-untyped-call]
    monkeypatch.setattr(cli, "connect", lambda settings: redis)
    monkeypatch.setattr(cli, "configure_logging", lambda log_format: None)
    monkeypatch.setenv("CALLSTATE_SHARDS", "4")
    assert cli.main(["migrate-keys"]) == cli.PROBLEM
    assert "stop the workers" in capsys.readouterr().err
    assert redis.exists("cs:log:0")


def test_moving_deliveries_killed_before_the_data_side_is_cleared_moves_them_once(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """move_deliveries writes the letters and counts on the queue's Redis, then takes them away
    on the data Redis: two servers, no transaction. Killed between the two, the next run (the
    refusal sends the operator back to it) appends the letters again and adds the counts
    again: a dead letter redelivered twice, and `delivered`/`dead_lettered` doubled."""
    queue = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    redis.lpush(KEYS.dead_letters(1), b'{"id": "job-1"}')
    redis.hset(KEYS.forward_counters(1), mapping={"delivered": 5, "dead_lettered": 1})
    killed_at(redis, "evalsha", lambda *args: KEYS.dead_letters(1) in args, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        move_deliveries(redis, queue, KEYS)
    assert unmigrated(redis, queue, KEYS) is not None

    move_deliveries(redis, queue, KEYS)
    assert queue.lrange(KEYS.dead_letters(1), 0, -1) == [b'{"id": "job-1"}']
    assert queue.hgetall(KEYS.forward_counters(1)) == {b"delivered": b"5", b"dead_lettered": b"1"}


def test_only_call_documents_are_taken_for_calls(store: Store) -> None:
    """`per_call_pattern("call")` is `cs:{s*}:call:*`, and `*` matches `}` too: an index key
    whose number or user id holds `}:call:` (any string is accepted there) matches, and a call
    id can be read out of it. `rebuild` and `rebuild --check` then count a call that does not exist
    (the release before matched `cs:call:*`, which only call documents start with)."""
    shard = store.keys.shard_of("c-1")
    store.redis.set(store.keys.call("c-1"), b"{}")
    store.redis.zadd(store.keys.active_by(shard, "user", "u}:call:ghost"), {"c-1": 1})
    store.redis.zadd(store.keys.history_by(shard, "number", "8}:call:phantom"), {"x": 0})
    assert store.docs.all_call_ids() == {"c-1"}


def web_started_while_redis_away(settings: Settings) -> tuple[Redis, FlaskClient]:
    """A store of the layout before hash tags, and a web that started while its Redis did not
    answer (so its start-up check could not be made); Redis answers again."""
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeRedis(server=server)
    load_old_store(redis)
    server.connected = False
    client = create_app(settings, redis).test_client()
    server.connected = True
    return redis, client


def test_a_move_killed_after_the_data_side_was_cleared_takes_nothing_away_twice(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the data side took the moved letters away and before the queue's marker
    went: the next run must not take them away again, so a letter the old set-up added
    meanwhile is moved, not lost."""
    queue = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    redis.lpush(KEYS.dead_letters(1), b'{"id": "job-1"}')
    redis.hset(KEYS.forward_counters(1), mapping={"dead_lettered": 1})
    killed_at(queue, "delete", lambda *keys: KEYS.deliveries_moved(1) in keys, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        move_deliveries(redis, queue, KEYS)
    assert redis.exists(KEYS.dead_letters(1), KEYS.forward_counters(1)) == 0

    redis.lpush(KEYS.dead_letters(1), b'{"id": "job-2"}')  # the old set-up, run again
    redis.hincrby(KEYS.forward_counters(1), "dead_lettered", 1)
    assert move_deliveries(redis, queue, KEYS) == 4  # the killed move's two, then the new two
    assert queue.lrange(KEYS.dead_letters(1), 0, -1) == [b'{"id": "job-1"}', b'{"id": "job-2"}']
    assert queue.hgetall(KEYS.forward_counters(1)) == {b"dead_lettered": b"2"}
    assert redis.exists(KEYS.dead_letters(1), KEYS.forward_counters(1)) == 0
    assert queue.exists(KEYS.deliveries_moved(1)) == redis.exists(KEYS.deliveries_moved(1)) == 0
