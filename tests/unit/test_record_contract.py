"""The record as a contract: the package's JSON Schema, served and embedded in the OpenAPI
document, fits every record the pipeline makes, and the suites' checks of it can fail."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from redis import Redis

from callstate import calls, record
from callstate.apidoc import openapi_document, record_schema
from callstate.calls import Doc
from callstate.config import Settings
from callstate.connection import text
from callstate.keys import Keys
from callstate.record import SCHEMA_VERSION, refresh_record
from callstate.schema import CALL_ID_PATTERN, MAX_DURATION_SECONDS, OPTIONAL_FIELDS
from callstate.web import create_app
from tests import record_contract
from tests.factories import SCENARIOS, ended, event, record_of, scenario

pytest_plugins = ["pytester"]
SCHEMA = record_schema()
PROPERTIES = SCHEMA["properties"]


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_every_record_names_the_schema_version_it_follows(deliver: Callable[..., Doc]) -> None:
    doc = deliver(ended("c-1", 10, "486 Busy Here", 0))
    assert (
        record_of(doc)["schema_version"] == SCHEMA_VERSION == PROPERTIES["schema_version"]["const"]
    )


@pytest.mark.parametrize("kind", SCENARIOS)
def test_records_of_every_kind_of_call_fit(deliver: Callable[..., Doc], kind: str) -> None:
    doc = deliver(*scenario(f"c-{kind}", kind, 10**12))
    assert record_contract.problems(record_of(doc)) == []
    assert record_contract.FAST.is_valid(record_of(doc))


def test_a_record_with_unknown_and_undocumented_fields_fits(deliver: Callable[..., Doc]) -> None:
    """The provider's loose fields as real payloads carry them: undocumented `event_id`,
    `serial`, `actor`, no durations at all, a recording notice with its own fields."""
    doc = deliver(
        event("c-2", "ringing", 10, event_id="OI1-1", serial=1, actor="", peerToPeer=True),
        ended("c-2", 20, "USER_END_CALL", 0, duration=None, answerDuration=None, original=False),
        {"call_id": "c-2", "recording_url": "https://x/r.mp3", "start_time": 1, "time": "15"},
    )
    assert record_of(doc)["revision"] == 2
    assert record_contract.problems(record_of(doc)) == []


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"disposition": "hung_up"}, "disposition"),
        ({"direction": "sideways"}, "direction"),
        ({"revision": 0}, "revision"),
        ({"sip_code": 99}, "sip_code"),
        ({"closed_by": None}, "closed_by"),
        ({"schema_version": 2}, "schema_version"),
        ({"timeline": {"hold": 5}}, "timeline"),
        ({"legs": [{"agent": "a"}]}, "legs/0"),
        ({"counts": {"accepted": 1}}, "counts"),
        ({"duration": MAX_DURATION_SECONDS + 1}, "duration"),
        ({"from": {"number": 84909985668}}, "from"),
        ({"call_id": "-x"}, "call_id"),
    ],
)
def test_a_wrong_record_does_not_fit(
    deliver: Callable[..., Doc], change: dict[str, Any], where: str
) -> None:
    record = record_of(deliver(ended("c-3", 10, "486 Busy Here", 0))) | change
    found = record_contract.problems(record)
    assert found and all(problem.startswith(where) for problem in found), found
    assert not record_contract.FAST.is_valid(record)  # the suites' fast check agrees


@pytest.mark.parametrize("name", [name for name in PROPERTIES if name in SCHEMA["required"]])
def test_a_record_without_a_required_field_does_not_fit(
    deliver: Callable[..., Doc], name: str
) -> None:
    record = record_of(deliver(ended("c-4", 10, "486 Busy Here", 0)))
    del record[name]
    assert record_contract.problems(record) == [f"(record): '{name}' is a required property"]
    assert not record_contract.FAST.is_valid(record)


def test_the_schema_types_every_field_the_webhook_checks_as_it_does() -> None:
    assert set(OPTIONAL_FIELDS) <= PROPERTIES.keys()
    assert PROPERTIES["call_id"]["pattern"] == f"^{CALL_ID_PATTERN.pattern}$"
    assert SCHEMA["$defs"]["Duration"]["maximum"] == MAX_DURATION_SECONDS


def test_a_stored_record_from_before_schema_version_is_not_republished(
    deliver: Callable[..., Doc],
) -> None:
    """An upgraded deployment: the stored record lacks the field; a later event that changes
    nothing else must not make a revision, one that does makes the next."""
    doc = deliver(ended("c-5", 10, "486 Busy Here", 0))
    assert doc["record"] is not None
    del doc["record"]["schema_version"]
    assert refresh_record(doc) is None
    assert "schema_version" not in record_of(doc)
    doc["fields"]["recording_url"] = "https://x/r.mp3"
    renewed = refresh_record(doc)
    assert renewed is not None
    assert (renewed["revision"], renewed["schema_version"]) == (2, SCHEMA_VERSION)


def test_served_without_the_read_token(settings: Settings, redis: Redis) -> None:
    client = create_app(dataclasses.replace(settings, api_token="secret"), redis).test_client()
    served = client.get("/schemas/record.json")
    assert served.status_code == 200
    assert served.mimetype == "application/schema+json"
    assert json.loads(served.data) == SCHEMA


def test_the_openapi_record_is_the_packaged_schema() -> None:
    """One source: the document's `Record` is the schema file, its `$defs` as `Record*`."""
    components = openapi_document()["components"]["schemas"]
    embedded = json.dumps(components["Record"]).replace("#/components/schemas/Record", "#/$defs/")
    assert json.loads(embedded) == {
        k: v for k, v in SCHEMA.items() if k not in ("$schema", "$defs")
    }
    for name, definition in SCHEMA["$defs"].items():
        copied = json.dumps(components[f"Record{name}"]).replace(
            "#/components/schemas/Record", "#/$defs/"
        )
        assert json.loads(copied) == definition


def test_a_misfit_made_in_the_pipeline_is_noted(
    deliver: Callable[..., Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The suites' wrapper sees records built inside the drainer (whose isolation would set an
    exception aside), so the running test fails (see the next test)."""
    assert vars(calls)["refresh_record"] is not record.refresh_record  # wrapped for the session
    monkeypatch.setattr(record, "disposition", lambda *_: "hung_up")
    deliver(ended("c-6", 10, "486 Busy Here", 0))
    noted = list(record_contract.violations)
    record_contract.violations.clear()
    assert noted == [
        "record of 'c-6': disposition: 'hung_up' is not one of "
        + repr(PROPERTIES["disposition"]["enum"])
    ]


def test_a_wrong_record_fails_its_test_even_from_a_fixture(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("from tests.conftest import *  # noqa: F403")
    pytester.makepyfile(
        """
        from callstate import record
        from tests.factories import ended

        import pytest

        def test_wrong(deliver, monkeypatch):
            monkeypatch.setattr(record, "sip_code", lambda cause: 7)
            deliver(ended("c-7", 10, "486 Busy Here", 0))

        @pytest.fixture
        def wrong_in_setup(deliver, monkeypatch):
            monkeypatch.setattr(record, "call_direction", lambda fields: "sideways")
            deliver(ended("c-8", 10, "486 Busy Here", 0))

        def test_wrong_in_a_fixture(wrong_in_setup):
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*record of 'c-7': sip_code: 7 is less than the minimum of 100*"])
    result.stdout.fnmatch_lines(["*record of 'c-8': direction: 'sideways' is not one of*"])


def test_a_wrong_published_record_is_found_in_the_stream(
    deliver: Callable[..., Doc], redis: Redis
) -> None:
    deliver(ended("c-8", 10, "486 Busy Here", 0))  # published by the drainer: fits
    record_contract.assert_stream_fits(redis)
    wrong = record_of(deliver(ended("c-9", 10, "486 Busy Here", 0))) | {"legs": None}
    entry = redis.xadd(Keys(Settings.key_prefix, 1).records(0), {"record": json.dumps(wrong)})
    assert record_contract.stream_violations(redis) == [
        f"{text(entry)}: legs: None is not of type 'array'"
    ]
    with pytest.raises(AssertionError, match=r"do not fit record\.schema\.json"):
        record_contract.assert_stream_fits(redis)
