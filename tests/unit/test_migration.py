"""`callstate migrate-keys` on a store the release before hash tags wrote
(tests/data/store-before-hash-tags.json: made by 20979eb, 12 calls on 4 shards with forwarding
on, one event logged and not applied, a tombstone and a dead letter)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from callstate import cli, recordstream
from callstate.config import Settings
from callstate.connection import text
from callstate.drain import Drainer
from callstate.keys import Keys
from callstate.machine import CallMachine
from callstate.migration import NotMigratedError, classify, migrate, old_layout_present
from callstate.rebuild import check
from callstate.store import Store
from callstate.web import create_app
from tests.factories import b64, body, event, load_old_store


@pytest.fixture
def old_settings(tmp_path: Path) -> Settings:
    return Settings(
        redis_url="redis://fake",
        embedded_redis=False,
        var_dir=tmp_path,
        shards=4,
        record_webhook_urls=("http://127.0.0.1:9/records",),
        record_webhook_secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )


def test_classify_names_every_old_family_and_leaves_todays_keys() -> None:
    keys = Keys("cs", 4)
    assert classify(keys, "cs:log:3") is not None
    assert classify(keys, "cs:log:3").new == keys.log(3)  # type: ignore[union-attr]
    odd = "a:b:call:7"  # call ids may hold colons
    assert classify(keys, f"cs:call:{odd}").new == keys.call(odd)  # type: ignore[union-attr]
    assert classify(keys, f"cs:tombstone:{odd}").new == keys.tombstone(odd)  # type: ignore[union-attr]
    found = classify(keys, "cs:history-number:2:849:1")
    assert found is not None and found.new == keys.history_by(2, "number", "849:1")
    found = classify(keys, "cs:active:user:u:1")
    assert found is not None and found.part is not None
    assert found.part(3) == keys.active_by(3, "user", "u:1")
    for today in (keys.log(3), keys.call(odd), keys.active(1), keys.records(0)):
        assert classify(keys, today) is None
    assert classify(keys, "cs:quarantine") is None
    assert classify(keys, "cs:stats:quarantined") is None


def test_the_service_refuses_an_old_store_until_it_is_migrated(
    redis: Redis, old_settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    load_old_store(redis)
    with pytest.raises(NotMigratedError, match="migrate-keys"):
        create_app(old_settings, redis)
    monkeypatch.setattr(cli, "connect", lambda settings: redis)
    monkeypatch.setattr(cli, "configure_logging", lambda log_format: None)
    monkeypatch.setenv("CALLSTATE_SHARDS", "4")
    assert cli.main(["stats"]) == cli.UNAVAILABLE
    assert "migrate-keys" in capsys.readouterr().err
    assert cli.main(["migrate-keys", "--check"]) == cli.PROBLEM
    assert "keys renamed" in capsys.readouterr().out
    assert old_layout_present(redis, Keys("cs", 4))
    assert cli.main(["migrate-keys"]) == cli.OK
    capsys.readouterr()
    assert not old_layout_present(redis, Keys("cs", 4))
    assert cli.main(["migrate-keys", "--check", "--json"]) == cli.OK
    nothing_left: dict[str, Any] = {"renamed": {}, "split": {}, "conflicts": [], "left": None}
    assert json.loads(capsys.readouterr().out) == nothing_left
    create_app(old_settings, redis)


def test_a_migrated_store_holds_every_call_record_and_index_and_goes_on(
    redis: Redis, old_settings: Settings, machine: CallMachine
) -> None:
    fixture = load_old_store(redis)
    before = {b64(k).decode(): item for k, item in fixture["keys"].items()}
    old_active = [
        b64(m).decode() for m, _ in sorted(before["cs:active"]["value"], key=lambda p: -p[1])
    ]
    old_records = [
        (entry_id, {b64(k): b64(v) for k, v in f.items()})
        for entry_id, f in before["cs:records"]["value"]
    ]
    store = Store(redis, old_settings)
    old_applied = sum(int(b64(before[f"cs:stats:applied:{s}"]["value"])) for s in range(4))

    done = migrate(redis, store.keys)
    applied_before = store.docs.applied_count()
    assert applied_before == old_applied > 0
    assert done.conflicts == []
    assert sum(done.split.values()) == 2 + sum(k.startswith("cs:active:") for k in before)
    assert not [key for key in redis.keys("*") if classify(store.keys, text(key))]
    moves = {k: classify(store.keys, k) for k in before}
    renamed = {k: found.new for k, found in moves.items() if found and found.new}
    assert sum(done.renamed.values()) == len(renamed)
    for old, new in renamed.items():
        assert text(redis.type(new)) == before[old]["type"], old

    assert check(store, machine).differing == []
    total, docs = store.docs.active_calls(None, None, 0, 100)
    assert [doc["call_id"] for doc in docs] == old_active and total == len(old_active)
    by_number = store.docs.active_calls("84909985668", None, 0, 100)[0]
    assert by_number == len(before["cs:active:number:84909985668"]["value"])
    moved = [(r.entry_id, r.fields) for r in recordstream.every(redis, store.keys)]
    assert sorted(moved) == sorted(old_records)
    assert 0 < redis.pttl(store.keys.call("old-1")) <= before["cs:call:old-1"]["pttl"]
    assert redis.exists(store.keys.tombstone("old-gone"))
    assert redis.llen(store.keys.dead_letters(1)) == 1
    assert store.docs.get_doc("old-2")["status"] != "ended"  # type: ignore[index]

    drainer = Drainer(
        store, machine, batch=50, slice_ms=60_000, linger_ms=0, window_ms=0, wake=lambda s: None
    )
    for shard in range(4):
        drainer.drain(shard)
    assert store.docs.get_doc("old-2")["status"] == "ended"  # type: ignore[index]
    assert store.docs.applied_count() == applied_before + 1, "the logged event once, no other again"
    _, shard, _ = store.log.append_event("old-0", body(event("old-0", "answered", 3000)))
    drainer.drain(shard)
    assert store.docs.get_doc("old-0")["status"] == "answered"  # type: ignore[index]
    assert check(store, machine).differing == []


def test_a_key_whose_new_name_exists_is_left_and_named(
    redis: Redis, old_settings: Settings
) -> None:
    load_old_store(redis)
    keys = Keys("cs", 4)
    redis.set(keys.cursor(0), "1-0")
    done = migrate(redis, keys)
    assert done.conflicts == ["cs:cursor:0"]
    assert redis.get("cs:cursor:0") is not None
