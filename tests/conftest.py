"""Fixtures shared by all tests: settings, a fakeredis-backed store, the machine, a drain helper."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from callstate import calls, record
from callstate.calls import Doc
from callstate.config import Settings
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.store import Store
from callstate.web import create_app
from tests import record_contract
from tests.factories import body


@pytest.fixture(scope="session", autouse=True)
def records_fit_their_schema() -> Iterator[None]:
    """Every record built in this process is checked against the package's JSON Schema."""
    with pytest.MonkeyPatch.context() as patch:
        # The drainer calls the name it imported; refresh_record calls build_record.
        patch.setattr(
            calls, "refresh_record", record_contract.noting_violations(record.refresh_record)
        )
        patch.setattr(
            record, "build_record", record_contract.noting_violations(record.build_record)
        )
        yield


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    record_contract.violations.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail the test during which (or during whose fixtures' setup) a record that does not fit
    the schema was built."""
    yield
    if record_contract.violations:
        found = list(record_contract.violations)
        record_contract.violations.clear()
        pytest.fail("records that do not fit record.schema.json:\n" + "\n".join(found))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(redis_url="redis://fake", embedded_redis=False, var_dir=tmp_path, shards=4)


@pytest.fixture
def redis() -> Iterator[Redis]:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    yield client
    client.flushall()


@pytest.fixture
def store(redis: Redis, settings: Settings) -> Store:
    return Store(redis, settings)


@pytest.fixture(scope="session")
def machine() -> CallMachine:
    return CallMachine()


@pytest.fixture
def woken() -> list[int]:
    """Shards for which a drain job handed over to a queued successor."""
    return []


@pytest.fixture
def wake(store: Store, woken: list[int]) -> Callable[[int], None]:
    """What a drain job does at the end of its slice, with the queueing recorded in `woken`."""

    def claim_and_record(shard: int) -> None:
        if store.coordination.wakes.claim(shard):
            woken.append(shard)

    return claim_and_record


@pytest.fixture
def drainer(store: Store, machine: CallMachine, wake: Callable[[int], None]) -> Drainer:
    return Drainer(store, machine, batch=7, slice_ms=60_000, linger_ms=0, window_ms=0, wake=wake)


@pytest.fixture
def deliver(store: Store, drainer: Drainer) -> Callable[..., Doc]:
    """Log payloads as the webhook would, drain their shards, return the last call's document."""

    def send(*payloads: dict[str, Any]) -> Doc:
        shards = set()
        for payload in payloads:
            _, shard, _ = store.log.append_event(payload["call_id"], body(payload))
            shards.add(shard)
        for shard in shards:
            drainer.drain(shard)
        doc = store.docs.get_doc(payloads[-1]["call_id"])
        assert doc is not None
        return doc

    return send


@pytest.fixture
def app(settings: Settings, redis: Redis) -> Flask:
    """The real application on the test's fakeredis."""
    return create_app(settings, redis)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
