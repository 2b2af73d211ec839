"""CALLSTATE_REPLICA_ACKS against a real primary and replica: the webhook acknowledges an event
only once a replica has it, and answers 503 (the event kept and applied once) when none does."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from openapi_schema_validator import OAS31Validator

from callstate.apidoc import openapi_document
from callstate.connection import StreamRows, text
from tests.factories import event
from tests.integration.stack import RedisServer, Stack, free_port, wait_until

MakeStack = Callable[..., Stack]
TIMEOUT_MS = 300

pytestmark = pytest.mark.ha  # `make test-ha`: Redis replicas and sentinels


@pytest.fixture
def replica(redis_server: RedisServer, tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "replica", replica_of=redis_server)
    server.start()
    yield server
    server.resume()
    server.stop()


def call_doc(stack: Stack, call_id: str) -> dict[str, Any] | None:
    response = stack.get(f"/calls/{call_id}")
    return response.json() if response.ok else None


def test_an_event_is_acknowledged_once_a_replica_has_it(
    make_stack: MakeStack, replica: RedisServer
) -> None:
    stack = make_stack(CALLSTATE_REPLICA_ACKS="1", CALLSTATE_REPLICA_ACK_TIMEOUT_MS=str(TIMEOUT_MS))
    stack.start_workers(1)
    stack.start_web(1)
    log_key = stack.keys.log(stack.keys.shard_of("rep-1"))

    created = stack.post(event("rep-1", "created", 1_000))
    assert created.status_code == 200, created.text
    log_id = created.json()["log_id"]
    assert replica.client().xrange(log_key, log_id, log_id), "acknowledged before a replica had it"

    ringing = event("rep-1", "ringing", 2_000)
    replica.pause()
    try:
        started = time.monotonic()
        refused = stack.post(ringing)
        waited = time.monotonic() - started
    finally:
        replica.resume()
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "not_replicated"
    assert "0 of the 1 replicas" in refused.json()["message"]
    assert waited >= TIMEOUT_MS / 1000
    # Refused, not lost: the primary logged it and the drain applies it.
    wait_until(
        lambda: (call_doc(stack, "rep-1") or {}).get("status") == "ringing", 20, "ringing applied"
    )

    wait_until(replica.replicating, 20, "the replica to catch up")
    # As on a replica promoted by a failover: the server knows none of the web's scripts.
    stack.redis.client().script_flush()
    again = stack.post(ringing)
    assert again.status_code == 200, again.text
    assert replica.client().xrange(log_key, again.json()["log_id"], again.json()["log_id"])
    counts = wait_until(
        lambda: (doc := call_doc(stack, "rep-1")) and doc["counts"]["duplicate"] == 1 and doc,
        20,
        "the delivery again to be counted a duplicate",
    )["counts"]
    assert (counts["accepted"], counts["rejected"]) == (2, 0)
    ready = stack.get("/readyz").json()["checks"]["replicas"]
    assert ready == {"ok": True, "connected": 1, "required": 1}

    # A replica gone (not hung): the primary sees it at once, and so does readiness.
    replica.stop()
    wait_until(lambda: stack.get("/readyz").status_code == 503, 20, "readyz to fail")
    unready = stack.get("/readyz").json()
    assert unready["failing"] == ["replicas"], unready
    assert unready["checks"]["replicas"] == {"ok": False, "connected": 0, "required": 1}
    components = openapi_document()["components"]
    readiness = {"$ref": "#/components/schemas/Readiness", "components": components}
    OAS31Validator(readiness).validate(unready)
    answer = stack.post(event("rep-1", "ended", 3_000))
    assert (answer.status_code, answer.json()["error"]) == (503, "not_replicated")


def test_without_replica_acks_a_hung_replica_does_not_hold_the_webhook(
    make_stack: MakeStack, replica: RedisServer
) -> None:
    stack = make_stack()
    stack.start_web(1)
    replica.pause()
    answer = stack.post(event("rep-2", "created", 1_000))
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("replica_acks", [0, 1])
def test_a_failover_loses_only_events_that_were_not_acknowledged(
    make_stack: MakeStack, redis_server: RedisServer, replica: RedisServer, replica_acks: int
) -> None:
    """The replica cut off from the primary (a partition), events posted, the primary lost and
    the replica promoted: without acknowledgements from replicas, events answered 200 are gone;
    with them, every event answered 200 is on the new primary (the others got 503)."""
    stack = make_stack(
        CALLSTATE_REPLICA_ACKS=str(replica_acks),
        CALLSTATE_REPLICA_ACK_TIMEOUT_MS=str(TIMEOUT_MS),
    )
    stack.start_web(1)
    replica.client().replicaof("127.0.0.1", free_port())  # follows a primary that is not there
    wait_until(lambda: not replica.replicating(), 20, "the replica to lose its primary")
    answers = [stack.post(event(f"cut-{n}", "created", 1_000)) for n in range(5)]
    acknowledged = [answer.json()["log_id"] for answer in answers if answer.status_code == 200]
    redis_server.kill()
    promoted = replica.client()
    promoted.replicaof("NO", "ONE")

    kept = {
        text(log_id)
        for shard in range(stack.keys.shards)
        for log_id, _ in cast(StreamRows, promoted.xrange(stack.keys.log(shard)))
    }
    lost = [log_id for log_id in acknowledged if log_id not in kept]
    if replica_acks:
        assert (acknowledged, lost) == ([], [])
        assert {answer.json()["error"] for answer in answers} == {"not_replicated"}
    else:
        assert len(acknowledged) == 5 and lost == acknowledged
