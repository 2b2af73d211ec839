"""`rebuild` on a real Redis with more records to rewrite in one shard than one command of the
commit script can carry: Lua unpacks at most ~8,000 arguments into a command."""

from __future__ import annotations

from pathlib import Path

from callstate.config import Settings
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.rebuild import check, rebuild
from callstate.store import Store
from tests.factories import body, ended, event
from tests.integration.stack import RedisServer

SHARD = 0
# Each record is two arguments of the history's HSET and of its index's ZADD: past ~4,000 the
# command no longer fits.
ENDED_CALLS = 4_200


def test_a_rebuild_rewriting_thousands_of_records_in_a_shard_completes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Since rebuild writes through the commit script (67c0361), the history's writes of a shard
    went as one HSET and one ZADD of every record: past ~4,000 records the script failed with
    "too many results to unpack" after it had deleted the shard's active-call indexes and
    counts, so the shard's active calls vanished from every lookup, and each rebuild failed
    the same way. Under the one MULTI before it, the same rebuild succeeded."""
    settings = Settings(
        redis_url=redis_server.url, embedded_redis=False, var_dir=tmp_path, shards=4
    )
    store = Store(redis_server.client(), settings)
    machine = CallMachine()
    found = (f"big-{n}" for n in range(100_000))
    ids = [call_id for call_id in found if store.keys.shard_of(call_id) == SHARD]
    ringing, ended_ids = ids[0], ids[1 : 1 + ENDED_CALLS]
    store.log.append_event(ringing, body(event(ringing, "ringing", 1)))
    for n, call_id in enumerate(ended_ids):
        store.log.append_event(call_id, body(ended(call_id, 100 + n, "486 Busy Here", 0)))
    woken: list[int] = []
    drainer = Drainer(
        store, machine, batch=500, slice_ms=600_000, linger_ms=0, window_ms=0, wake=woken.append
    )
    drainer.drain(SHARD)
    assert store.redis.hlen(store.keys.history(SHARD)) == ENDED_CALLS
    # Something for the rebuild to rewrite: every ended call's document gone.
    pipe = store.redis.pipeline(transaction=False)
    for call_id in ended_ids:
        pipe.delete(store.keys.call(call_id))
    pipe.execute()

    assert rebuild(store, machine).rewritten == ENDED_CALLS
    assert store.docs.active_calls(None, None, 0, 10)[0] == 1
    assert check(store, machine).differing == []
