"""Review of the one-script commit (issue 12) against a real Redis server: a batch the settings
allow must commit whole or not at all."""

from __future__ import annotations

from pathlib import Path

from redis.exceptions import ResponseError

from callstate.config import MAX_DRAIN_BATCH, Settings
from callstate.drain import Drainer
from callstate.eventlog import event_fields
from callstate.machine import CallMachine
from callstate.store import Store
from tests.factories import body, ended
from tests.integration.stack import RedisServer

# Each publishes a record: the history's HSET of the batch then takes 2 + 2 x 2,000 arguments,
# the most a batch the settings allow can ask of one command (Redis' Lua passes ~8,000).
CALLS = MAX_DRAIN_BATCH


def test_a_batch_publishing_thousands_of_records_commits_whole_or_not_at_all(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The largest batch the settings allow, every call ending: a commit script that failed on
    its largest write (the history's HSET) would leave what ran before it written, the cursor
    unmoved, and the next job would apply the batch again. It commits whole."""
    settings = Settings(
        redis_url=redis_server.url, embedded_redis=False, var_dir=tmp_path, shards=1
    )
    redis = redis_server.client()
    store = Store(redis, settings)
    pipe = redis.pipeline(transaction=False)
    for n in range(CALLS):
        call = f"review-end-{n}"
        payload = body(ended(call, 1_515_859_270_000, "486 Busy Here", 0))
        pipe.xadd(store.keys.log(0), event_fields(call, payload))
    pipe.execute()
    drainer = Drainer(
        store,
        CallMachine(),
        batch=CALLS,
        slice_ms=60_000,
        linger_ms=0,
        window_ms=0,
        wake=lambda shard: None,
    )
    failed: Exception | None = None
    try:
        drainer.drain(0)
    except ResponseError as exc:
        failed = exc
    published = redis.xlen(store.keys.records(0))
    cursor = store.log.cursor(0)
    assert (cursor is None and published == 0) or (cursor is not None and published == CALLS), (
        f"half a commit: {published} records published, cursor {cursor}, drain raised {failed}"
    )
    assert failed is None, "a batch the settings allow fails on every job: the shard is stuck"
