"""The webhook and lookup endpoints through Flask's test client, on fakeredis."""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from flask import jsonify
from flask.testing import FlaskClient
from redis import Redis
from rq import Queue
from werkzeug.test import TestResponse

from callstate.codec import unpack
from callstate.config import Settings
from callstate.connection import StreamRows
from callstate.drain import Drainer
from callstate.eventlog import event_fields
from callstate.signature import sign
from callstate.store import Store
from callstate.web import create_app
from callstate.webhook import QUARANTINE_PREVIEW_BYTES
from tests.factories import body, ended, event, example, record_of

URL = "/webhooks/stringee"
FAR_FUTURE_MS = int(time.time() * 1000) + 3600 * 1000


def json_of(response: TestResponse) -> Any:
    data = response.get_json()
    assert data is not None, response.data
    return data


JSON = {"Content-Type": "application/json"}


@pytest.fixture
def post(client: FlaskClient) -> Callable[..., Any]:
    def send(payload: dict[str, Any]) -> Any:
        return client.post(URL, data=body(payload), headers=JSON)

    return send


def drain_all(drainer: Drainer, settings: Settings) -> None:
    for shard in range(settings.shards):
        drainer.drain(shard)


def stored_state(redis: Redis) -> dict[bytes, Any]:
    """Every key and its content, to show a refused delivery changed nothing."""
    state: dict[Any, Any] = {}
    for key in redis.keys("*"):
        kind = redis.type(key)
        if kind == b"string":
            state[key] = redis.get(key)
        elif kind == b"stream":
            state[key] = redis.xrange(key)
        elif kind == b"zset":
            state[key] = redis.zrange(key, 0, -1, withscores=True)
        elif kind == b"list":
            state[key] = redis.lrange(key, 0, -1)
        else:
            state[key] = kind
    return state


def test_the_stored_answer_is_what_jsonify_would_send(
    client: FlaskClient, post: Callable[..., Any]
) -> None:
    response = post(event("c.1:x@y_z-9", "ringing", 1))
    log_id = json_of(response)["log_id"]
    with client.application.app_context():
        expected = jsonify({"status": "stored", "call_id": "c.1:x@y_z-9", "log_id": log_id})
    assert (response.status_code, response.content_type) == (200, expected.content_type)
    assert response.get_data() == expected.get_data()


def test_webhook_logs_the_raw_event_and_queues_one_drain(
    post: Callable[..., Any], store: Store, redis: Redis, settings: Settings
) -> None:
    payload = example("started")
    response = post(payload)
    assert response.status_code == 200
    assert json_of(response)["status"] == "stored"
    shard = store.keys.shard_of(payload["call_id"])
    logged = cast(StreamRows, redis.xrange(store.keys.log(shard)))
    assert len(logged) == 1
    assert unpack(logged[0][1][b"event"]) == body(payload)
    assert json_of(response)["log_id"] == logged[0][0].decode()
    post(event(payload["call_id"], "ringing", payload["timestamp_ms"] + 1))
    assert Queue(settings.queue_name, connection=redis).count == 1


def test_lookups_after_drain(
    post: Callable[..., Any], client: FlaskClient, drainer: Drainer, settings: Settings
) -> None:
    call_id = "call-1"
    for payload in (
        event(call_id, "ringing", 1000),
        event(call_id, "ringing", 1000),
        event(call_id, "answered", 1002),
        event(call_id, "started", 999),
    ):
        assert post(payload).status_code == 200
    drain_all(drainer, settings)
    call = json_of(client.get(f"/calls/{call_id}"))
    assert call["status"] == "answered"
    assert call["counts"] == {"accepted": 2, "duplicate": 1, "rejected": 1, "annotation": 0}
    assert call["timeline"] == {"ringing": 1000, "answered": 1002, "started": 999}
    assert call["active"] is True
    assert call["version"] == 4
    events = json_of(client.get(f"/calls/{call_id}/events"))["events"]
    assert [(e["verdict"], e["reason"]) for e in events] == [
        ("accepted", None),
        ("duplicate", None),
        ("accepted", None),
        ("rejected", "out_of_order"),
    ]
    assert events[3]["payload"]["call_status"] == "started"
    record = client.get(f"/calls/{call_id}/record")
    assert record.status_code == 404
    assert json_of(record)["error"] == "not_ended"
    post(ended(call_id, 1100, "USER_END_CALL", 50))
    drain_all(drainer, settings)
    assert json_of(client.get(f"/calls/{call_id}/record"))["disposition"] == "answered"
    assert json_of(client.get(f"/calls/{call_id}"))["active"] is False


def test_unknown_call_is_404(client: FlaskClient) -> None:
    for path in ("/calls/nope", "/calls/nope/events", "/calls/nope/record", "/calls/bad*id"):
        response = client.get(path)
        assert response.status_code == 404
        assert json_of(response)["error"] == "not_found"


def test_active_listing_filters_and_pages(
    post: Callable[..., Any], client: FlaskClient, drainer: Drainer, settings: Settings
) -> None:
    for n in range(5):
        post(
            event(
                f"a-{n}",
                "ringing",
                1000 + n,
                request_from_user_id=f"user-{n % 2}",
                to={"number": f"8490000000{n % 3}"},
            )
        )
    post(ended("a-4", 2000, "486 Busy Here", 0))
    drain_all(drainer, settings)
    listing = json_of(client.get("/calls?active=true"))
    assert listing["total"] == 4
    assert {c["call_id"] for c in listing["calls"]} == {"a-0", "a-1", "a-2", "a-3"}
    by_user = json_of(client.get("/calls?active=true&user=user-0"))
    assert {c["call_id"] for c in by_user["calls"]} == {"a-0", "a-2"}
    by_number = json_of(client.get("/calls?active=true&number=84900000000"))
    assert {c["call_id"] for c in by_number["calls"]} == {"a-0", "a-3"}
    caller = json_of(client.get("/calls?active=true&number=84899199866"))
    assert caller["total"] == 4
    both = json_of(client.get("/calls?active=true&number=84900000000&user=user-0"))
    assert [c["call_id"] for c in both["calls"]] == ["a-0"]
    assert both["total"] == 1
    page = json_of(client.get("/calls?active=true&limit=2&offset=1"))
    assert [c["call_id"] for c in page["calls"]] == ["a-2", "a-1"]
    assert page["total"] == 4


def hear_at(store: Store, ms: int, payload: dict[str, Any]) -> None:
    """Log an event as received at `ms`, the time its log id carries (a webhook takes the
    server's clock, which a test cannot step without sleeping)."""
    call_id: str = payload["call_id"]
    log = store.keys.log(store.keys.shard_of(call_id))
    store.redis.xadd(log, event_fields(call_id, body(payload)), id=f"{ms}-0")


def test_active_calls_are_listed_most_recently_heard_first(
    client: FlaskClient, store: Store, drainer: Drainer, settings: Settings
) -> None:
    """The order is when each call was last heard: not its call id, when it started, nor its
    events' own timestamps."""
    for received_ms, call_id, status, timestamp_ms in (
        (1000, "a-1", "ringing", 10),
        (2000, "a-3", "ringing", 20),
        (3000, "a-0", "ringing", 40),
        (4000, "a-2", "ringing", 30),
        (5000, "a-3", "answered", 21),
        (6000, "a-1", "answered", 11),
    ):
        hear_at(store, received_ms, event(call_id, status, timestamp_ms))
    drain_all(drainer, settings)
    heard = ["a-1", "a-3", "a-2", "a-0"]
    for query in ("", "&user=huydn", "&number=84909985668", "&number=84899199866&user=huydn"):
        calls = json_of(client.get(f"/calls?active=true{query}"))["calls"]
        assert [c["call_id"] for c in calls] == heard, query
        assert [c["last_received_ms"] for c in calls] == [6000, 5000, 4000, 3000], query
    page = json_of(client.get("/calls?active=true&limit=2&offset=1"))
    assert [c["call_id"] for c in page["calls"]] == ["a-3", "a-2"]


def test_index_follows_the_agent_of_a_call_center_call(
    post: Callable[..., Any], client: FlaskClient, drainer: Drainer, settings: Settings
) -> None:
    post(event("cc-1", "ringing", 1, to={"number": "agent-1"}))
    post(event("cc-1", "agentEnded", 2, to={"number": "agent-1"}))
    post(event("cc-1", "ringing", 3, to={"number": "agent-2"}))
    drain_all(drainer, settings)
    assert json_of(client.get("/calls?active=true&number=agent-1"))["total"] == 0
    assert json_of(client.get("/calls?active=true&number=agent-2"))["total"] == 1


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?active=false",
        "?active=true&limit=0",
        "?active=true&limit=x",
        "?active=true&offset=-1",
        "?active=true&limit=501",
    ],
)
def test_bad_listing_query_is_400(client: FlaskClient, query: str) -> None:
    response = client.get(f"/calls{query}")
    assert response.status_code == 400
    assert json_of(response)["field"] in ("active", "limit", "offset")


@pytest.mark.parametrize(
    ("data", "headers", "status", "error"),
    [
        (b"{oops", JSON, 400, "invalid_json"),
        (b"[1]", JSON, 422, "invalid_payload"),
        (body({"call_status": "ringing", "timestamp_ms": 1}), JSON, 422, "missing_field"),
        (
            body(event("c", "ringing", 1)),
            {"Content-Type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
        (body(event("c", "ringing", 1)), {}, 415, "unsupported_media_type"),
        (body(event("c", "ringing", 1))[:-1] + rb', "x": "\ud800"}', JSON, 422, "invalid_field"),
        (b'{"call_id": "c", "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", JSON, 422, "too_deep"),
        (body(event("c", "ringing", 10**40)), JSON, 422, "out_of_range"),
        (body(event("c", "ringing", FAR_FUTURE_MS)), JSON, 422, "out_of_range"),
        (body(ended("c", 1, "486 Busy Here", -5)), JSON, 422, "out_of_range"),
        # An unterminated string of escaped quotes: a scan that retried at every quote was
        # quadratic here (about 20 s of CPU for 64 KiB).
        ((b"[" * 17 + b'"' + b'\\"' * 30_000)[:65_000], JSON, 422, "too_deep"),
        ((b'{"a": "' + b'x\\"' * 20_000 + b"[" * 20), JSON, 400, "invalid_json"),
    ],
)
def test_bad_delivery_gets_a_json_error_and_changes_nothing(
    client: FlaskClient,
    post: Callable[..., Any],
    store: Store,
    redis: Redis,
    data: bytes,
    headers: dict[str, str],
    status: int,
    error: str,
) -> None:
    post(event("c", "ringing", 0))
    before = stored_state(redis)
    response = client.post(URL, data=data, headers=headers)
    assert response.status_code == status
    assert json_of(response)["error"] == error
    assert json_of(response)["message"]
    after = stored_state(redis)
    quarantine = after.pop(store.keys.quarantine().encode(), [])
    counted = after.pop(store.keys.quarantined_counter().encode(), None)
    assert after == before
    assert len(quarantine) == 1 and counted == b"1"


OVERSIZED = b'{"call_id": "c", "call_status": "ringing", "x": "' + b"y" * 70_000 + b'"}'


def test_a_body_over_the_size_limit_is_413_and_logs_nothing(
    client: FlaskClient, post: Callable[..., Any], store: Store, redis: Redis
) -> None:
    """An oversized delivery gets a JSON 413 and is neither logged nor queued."""
    post(event("c", "ringing", 0))
    before = stored_state(redis)
    response = client.post(URL, data=OVERSIZED, headers=JSON)
    assert response.status_code == 413
    assert json_of(response)["error"] == "request_entity_too_large"
    assert json_of(response)["message"]
    after = stored_state(redis)
    after.pop(store.keys.quarantine().encode(), None)
    after.pop(store.keys.quarantined_counter().encode(), None)
    assert after == before


def test_a_body_over_the_size_limit_is_quarantined_with_a_preview(
    client: FlaskClient, store: Store
) -> None:
    """An operator must see a refused delivery: its size and the start of its body."""
    assert client.post(URL, data=OVERSIZED, headers=JSON).status_code == 413
    quarantined = store.quarantine.recent(5)
    assert len(quarantined) == 1
    [item] = quarantined
    assert (item["status"], item["error"]) == (413, "request_entity_too_large")
    assert item["bytes"] == len(OVERSIZED)
    assert item["body"] == OVERSIZED[:QUARANTINE_PREVIEW_BYTES].decode()


def test_quarantine_preview_masks_phone_numbers(client: FlaskClient, store: Store) -> None:
    refused = body(event("c", "ringing", 1, duration=-1))
    assert client.post(URL, data=refused, headers=JSON).status_code == 422
    [item] = store.quarantine.recent(5)
    assert "84909985668" not in item["body"] and "84899199866" not in item["body"]
    assert '"number": "********668"' in item["body"]
    assert '"duration": -1' in item["body"]
    assert (item["field"], item["bytes"]) == ("duration", len(refused))


@pytest.mark.parametrize(
    "refused",
    [
        b'{"call_id":"c1","call_status":"ringing","timestamp_ms":1,"from":{"number":84909985668}}',
        b'{"call_id":"c1","duration":-1,"to":{"n\\u0075mber":"84909985668"}}',
        b'{"call_id":"c1","duration":-1,"timestamp_ms":1,"x":"'
        + b"y" * 1965  # the preview (2 KiB) ends eight digits into the number
        + b'","to":{"number":"84909985668"}}',
    ],
)
def test_quarantine_preview_masks_numbers_however_they_are_written(
    client: FlaskClient, store: Store, refused: bytes
) -> None:
    assert client.post(URL, data=refused, headers=JSON).status_code == 422
    [item] = store.quarantine.recent(5)
    assert "8490998" not in item["body"]


def test_quarantine_is_bounded(client: FlaskClient, store: Store, settings: Settings) -> None:
    for n in range(settings.quarantine_max + 5):
        client.post(URL, data=b"garbage %d" % n, headers=JSON)
    kept = store.quarantine.recent(settings.quarantine_max + 10)
    assert len(kept) == settings.quarantine_max
    assert kept[0]["body"] == f"garbage {settings.quarantine_max + 4}"


def signed_app(settings: Settings, redis: Redis) -> FlaskClient:
    secret_settings = dataclasses.replace(settings, signing_secret="s3cret")
    return create_app(secret_settings, redis).test_client()


def test_signature_is_required_when_a_secret_is_set(settings: Settings, redis: Redis) -> None:
    client = signed_app(settings, redis)
    raw = body(example("started"))
    good = {**JSON, "X-STRINGEE-SIGNATURE": sign("s3cret", raw)}
    wrong = {**JSON, "X-STRINGEE-SIGNATURE": sign("other", raw)}
    assert client.post(URL, data=raw, headers=JSON).status_code == 401
    assert json_of(client.post(URL, data=raw, headers=wrong))["error"] == "bad_signature"
    tampered = raw.replace(b"started", b"ringing")
    assert client.post(URL, data=tampered, headers=good).status_code == 401
    assert client.post(URL, data=raw, headers=good).status_code == 200


def test_previous_secret_is_accepted_during_a_rotation(settings: Settings, redis: Redis) -> None:
    rotating = dataclasses.replace(
        settings, signing_secret="new-secret", signing_secret_previous="old-secret"
    )
    client = create_app(rotating, redis).test_client()
    raw = body(example("started"))
    for secret, status in (("new-secret", 200), ("old-secret", 200), ("other", 401)):
        headers = {**JSON, "X-STRINGEE-SIGNATURE": sign(secret, raw)}
        assert client.post(URL, data=raw, headers=headers).status_code == status


@pytest.mark.parametrize(
    ("host", "secret", "token", "warnings"),
    [
        ("127.0.0.1", None, None, []),
        ("localhost", None, None, []),
        ("0.0.0.0", None, None, ["STRINGEE_SIGNING_SECRET", "CALLSTATE_API_TOKEN"]),
        ("10.1.2.3", "s", None, ["CALLSTATE_API_TOKEN"]),
        ("my-host", None, "t", ["STRINGEE_SIGNING_SECRET"]),
        ("0.0.0.0", "s", "t", []),
    ],
)
def test_start_warns_when_reachable_without_secret_or_token(
    settings: Settings,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
    host: str,
    secret: str | None,
    token: str | None,
    warnings: list[str],
) -> None:
    exposed = dataclasses.replace(settings, host=host, signing_secret=secret, api_token=token)
    with caplog.at_level(logging.WARNING, logger="callstate.webhook"):
        create_app(exposed, redis)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SECURITY")]
    assert [name for name in warnings if any(name in line for line in said)] == warnings
    assert len(said) == len(warnings)


def test_read_endpoints_need_the_api_token_when_set(settings: Settings, redis: Redis) -> None:
    client = create_app(dataclasses.replace(settings, api_token="tok"), redis).test_client()
    assert client.get("/calls?active=true").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert json_of(client.get("/calls?active=true", headers=wrong))["error"] == "unauthorized"
    good = {"Authorization": "Bearer tok"}
    assert client.get("/calls?active=true", headers=good).status_code == 200
    assert client.post(URL, data=body(example("started")), headers=JSON).status_code == 200


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_redis_is_503_never_200(settings: Settings) -> None:
    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    client = create_app(down).test_client()
    response = client.post(URL, data=body(example("started")), headers=JSON)
    assert response.status_code == 503
    assert json_of(response)["error"] == "unavailable"
    assert client.get("/calls/some-call").status_code == 503


def test_each_project_signs_with_its_own_secret(settings: Settings, redis: Redis) -> None:
    client = create_app(
        dataclasses.replace(settings, project_secrets={25: ("s25",), 26: ("s26",)}), redis
    ).test_client()
    ours = body(event("c-25", "ringing", 1, project_id=25))
    as_string = body(event("c-25", "ringing", 2, project_id="25"))
    theirs = body(event("c-26", "ringing", 1, project_id=26))
    dtmf = body({"call_id": "c-25", "dtmf": "1", "time": "1530870073736"})
    for raw, secret, status in (
        (ours, "s25", 200),
        (as_string, "s25", 200),
        (theirs, "s26", 200),
        (theirs, "s25", 401),  # a project's secret does not vouch for another project
        (ours, "other", 401),
        (dtmf, "s26", 200),  # names no project: any project's valid signature
    ):
        headers = {**JSON, "X-STRINGEE-SIGNATURE": sign(secret, raw)}
        assert client.post(URL, data=raw, headers=headers).status_code == status, (raw, secret)


def test_accounts_and_projects_outside_the_allow_lists_are_403(
    settings: Settings, redis: Redis, store: Store
) -> None:
    allowed = dataclasses.replace(
        settings, account_sids=frozenset({"AC-ours"}), project_ids=frozenset({25})
    )
    client = create_app(allowed, redis).test_client()
    for payload, status, field in (
        (event("c-1", "ringing", 1, account_sid="AC-ours"), 200, None),
        (event("c-1", "ringing", 2, account_sid="AC-theirs"), 403, "account_sid"),
        (event("c-1", "ringing", 3, account_sid="AC-ours", project_id=99), 403, "project_id"),
        ({"call_id": "c-1", "recording_url": "https://r.example/1"}, 200, None),
    ):
        answer = client.post(URL, data=body(payload), headers=JSON)
        assert answer.status_code == status
        if field is not None:
            assert json_of(answer) | {"message": ""} == {
                "error": "forbidden",
                "field": field,
                "message": "",
            }
    assert [item["error"] for item in store.quarantine.recent(5)] == ["forbidden", "forbidden"]


def test_form_encoded_bodies_are_refused_naming_the_supported_type(client: FlaskClient) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = client.post(URL, data=b"call_id=c-1&call_status=ringing", headers=form)
    assert answer.status_code == 415
    assert "application/json" in json_of(answer)["message"]


def test_one_projects_secret_cannot_reach_another_projects_call(
    settings: Settings, redis: Redis, store: Store, drainer: Drainer
) -> None:
    projects = dataclasses.replace(settings, project_secrets={25: ("s25",), 26: ("s26",)})
    client = create_app(projects, redis).test_client()

    def post_signed(payload: dict[str, Any], secret: str) -> int:
        raw = body(payload)
        headers = {**JSON, "X-STRINGEE-SIGNATURE": sign(secret, raw)}
        return client.post(URL, data=raw, headers=headers).status_code

    assert post_signed(event("c-26", "answered", 1, project_id=26), "s26") == 200
    hijack = ended("c-26", 2, "486 Busy Here", 0, project_id=25)
    assert post_signed(hijack, "s25") == 200  # stored: it names a call
    assert post_signed({"call_id": "c-26", "answerDuration": 0, "recording_url": "x"}, "s25") == 200
    assert post_signed(ended("c-26", 3, "USER_END_CALL", 30, project_id=26), "s26") == 200
    drain_all(drainer, settings)
    doc = store.docs.get_doc("c-26")
    assert doc is not None
    assert [(e["verdict"], e["reason"]) for e in doc["journal"]] == [
        ("accepted", None),
        ("rejected", "wrong_project"),
        ("rejected", "wrong_project"),
        ("accepted", None),
    ]
    assert record_of(doc)["disposition"] == "answered" and record_of(doc)["project_id"] == 26
