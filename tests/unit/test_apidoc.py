"""The API description: a valid OpenAPI 3.1 document, served without a token, true to the app's
routes, to the webhook's field table and to what the lookups really answer."""

from __future__ import annotations

import dataclasses
import json
import re
from importlib import metadata
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from redis import Redis

from callstate.apidoc import openapi_document
from callstate.config import Settings
from callstate.drain import Drainer
from callstate.lookups import MAX_OFFSET
from callstate.schema import (
    CALL_ID_PATTERN,
    OPTIONAL_FIELDS,
    PARTY_FIELDS,
    PayloadError,
    parse_event,
)
from callstate.web import create_app
from tests.factories import DATA, SCENARIOS, body, event, scenario

DOC = openapi_document()
JSON = {"Content-Type": "application/json"}
NO_CLOCK_BOUND = 2**53  # the clock's bound is the one the document cannot state
SAMPLES: list[Any] = ["text", 7, -7, 1.5, True, None, {}, {"number": 5}, [], [1]]


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: `<path:filename>` becomes `{filename}`."""
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule)


def validator(schema: dict[str, Any]) -> OAS31Validator:
    """A validator of `schema` whose references resolve within the document."""
    return OAS31Validator({**schema, "components": DOC["components"]})


def component(name: str) -> OAS31Validator:
    return validator({"$ref": f"#/components/schemas/{name}"})


def answer_schema(path: str, status: str) -> OAS31Validator:
    answer = DOC["paths"][path]["get"]["responses"][status]
    return validator(answer["content"]["application/json"]["schema"])


def webhook_accepts(payload: Any) -> bool:
    try:
        parse_event(body(payload), latest_timestamp_ms=NO_CLOCK_BOUND)
    except PayloadError:
        return False
    return True


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(DOC)
    assert DOC["openapi"].startswith("3.1.")
    assert DOC["info"]["version"] == metadata.version("callstate")


def test_served_as_json_without_the_read_token(settings: Settings, redis: Redis) -> None:
    client = create_app(dataclasses.replace(settings, api_token="secret"), redis).test_client()
    served = client.get("/openapi.json")
    assert served.status_code == 200
    assert served.mimetype == "application/json"
    assert served.get_json() == json.loads(json.dumps(DOC))
    assert client.get("/calls/call-1").status_code == 401


def test_every_route_of_the_app_is_described(app: Flask) -> None:
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = openapi_path(rule.rule)
        methods = {method.lower() for method in rule.methods or ()} - {"head", "options"}
        assert path in DOC["paths"], path
        assert methods <= DOC["paths"][path].keys(), path


def test_a_method_the_document_does_not_list_is_405_naming_those_it_does(
    app: Flask, client: FlaskClient
) -> None:
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<call_id>", "call-1")
        documented = DOC["paths"][openapi_path(rule.rule)].keys()
        method = "PUT" if "put" not in documented else "DELETE"
        answer = client.open(path, method=method)
        assert answer.status_code == 405, path
        assert answer.get_json()["error"] == "method_not_allowed"
        allowed = {name.strip().lower() for name in answer.headers["Allow"].split(",")}
        assert allowed - {"head", "options"} == documented - {"parameters"}, path


@pytest.mark.parametrize("name", [*OPTIONAL_FIELDS, "call_status", "timestamp_ms"])
@pytest.mark.parametrize("value", SAMPLES)
def test_the_document_accepts_a_field_value_exactly_when_the_webhook_does(
    name: str, value: Any
) -> None:
    payload = {"call_id": "call-1", name: value}
    assert component("WebhookEvent").is_valid(payload) == webhook_accepts(payload)


@pytest.mark.parametrize("party", ["from", "to"])
@pytest.mark.parametrize("name", [*PARTY_FIELDS, "unknown"])
@pytest.mark.parametrize("value", SAMPLES)
def test_the_document_accepts_a_party_field_exactly_when_the_webhook_does(
    party: str, name: str, value: Any
) -> None:
    payload = {"call_id": "call-1", party: {name: value}}
    assert component("WebhookEvent").is_valid(payload) == webhook_accepts(payload)


@pytest.mark.parametrize(
    "payload",
    [
        {"call_status": "ringing"},
        {"call_id": ""},
        {"call_id": "a" * 128},
        {"call_id": "a" * 129},
        {"call_id": "-starts-with-a-dash"},
        {"call_id": "call-1", "call_status": "x" * 64},
        {"call_id": "call-1", "call_status": "x" * 65},
        {"call_id": "call-1", "timestamp_ms": -1},
        {"call_id": "call-1", "timestamp_ms": 0},
        {"call_id": "call-1", "duration": 86_400},
        {"call_id": "call-1", "duration": 86_401},
        {"call_id": "call-1", "answerDuration": -1},
        {"call_id": "call-1", "project_id": "25"},
        {"call_id": "call-1", "project_id": "2a"},
        {"call_id": "call-1", "project_id": "1" * 19},
        {"call_id": "call-1", "project_id": 2**53 - 1},
        {"call_id": "call-1", "project_id": 2**53},
        {"call_id": "call-1", "extra": {"deep": [2**53]}},
        {"call_id": "call-1", "extra": {"deep": [-(2**53) + 1, 0.5, 1e-300]}},
    ],
)
def test_the_document_states_the_webhook_bounds(payload: dict[str, Any]) -> None:
    assert component("WebhookEvent").is_valid(payload) == webhook_accepts(payload)


def test_the_document_accepts_the_real_payloads_the_webhook_accepts() -> None:
    corpus = json.loads((DATA / "real-payloads.json").read_text())
    verdicts = [webhook_accepts(item["payload"]) for item in corpus]
    assert any(verdicts) and not all(verdicts)
    for item, accepted in zip(corpus, verdicts, strict=True):
        assert component("WebhookEvent").is_valid(item["payload"]) == accepted, item["kind"]


def test_every_lookup_answer_fits_its_schema(
    client: FlaskClient, drainer: Drainer, settings: Settings
) -> None:
    """Calls of every kind, ended and live, with a recording notice and a duplicate."""
    ids = [f"call-{kind}" for kind in SCENARIOS]
    payloads = [p for n, kind in enumerate(SCENARIOS) for p in scenario(ids[n], kind, 10**12)]
    recording = {"call_id": ids[0], "recording_url": "https://x/r.mp3", "type": "recording"}
    live = event("call-live", "ringing", 10**12, project_id="25")
    for payload in [*payloads, payloads[0], recording, live]:
        posted = client.post("/webhooks/stringee", data=body(payload), headers=JSON)
        assert posted.status_code == 200
    for shard in range(settings.shards):
        drainer.drain(shard)

    for call_id in [*ids, "call-live"]:
        call = client.get(f"/calls/{call_id}")
        answer_schema("/calls/{call_id}", "200").validate(call.get_json())
        events = client.get(f"/calls/{call_id}/events")
        answer_schema("/calls/{call_id}/events", "200").validate(events.get_json())
    for call_id in ids:
        record = client.get(f"/calls/{call_id}/record")
        assert record.status_code == 200
        component("Record").validate(record.get_json())
    listing = client.get("/calls?active=true")
    assert listing.get_json()["total"] == 1
    answer_schema("/calls", "200").validate(listing.get_json())
    not_ended = client.get("/calls/call-live/record")
    assert not_ended.status_code == 404
    answer_schema("/calls/{call_id}/record", "404").validate(not_ended.get_json())


@pytest.mark.parametrize(
    "query",
    [
        "limit=%C2%B2",  # "²": str.isdigit() said yes, int() then raised (500)
        "offset=%C2%B2",
        "offset=%D9%A1",  # an Arabic-Indic 1
        f"offset={MAX_OFFSET + 1}",
        "offset=99999999999999999999",  # past 64 bits: Redis refused the range (503)
        "limit=0",
        "limit=501",
    ],
)
def test_a_bad_page_is_a_400_naming_it(client: FlaskClient, query: str) -> None:
    answer = client.get(f"/calls?active=true&{query}")
    assert answer.status_code == 400
    assert answer.get_json()["field"] == query.split("=")[0]
    answer_schema("/calls", "400").validate(answer.get_json())


def test_the_largest_page_and_offset_are_answered(client: FlaskClient) -> None:
    answer = client.get(f"/calls?active=true&limit=500&offset={MAX_OFFSET}")
    assert answer.status_code == 200
    assert answer.get_json() == {"total": 0, "offset": MAX_OFFSET, "limit": 500, "calls": []}


def test_the_documented_page_bounds_are_the_lookups_own() -> None:
    parameters = {p["name"]: p["schema"] for p in DOC["paths"]["/calls"]["get"]["parameters"]}
    assert parameters["offset"]["maximum"] == MAX_OFFSET
    pattern = DOC["components"]["schemas"]["CallId"]["pattern"]
    assert pattern == f"^{CALL_ID_PATTERN.pattern}$"
