"""The API against its own description: schemathesis drives every operation of GET /openapi.json
over HTTP (gunicorn, a real Redis, a real RQ worker) and checks each answer against it."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis import Case
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from callstate.apidoc import openapi_document
from tests.factories import ended, event
from tests.integration.stack import RedisServer, Stack, wait_until
from tests.record_contract import assert_stream_fits

TOKEN = "schemathesis-read-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The board's event stream never ends, so no answer to it can be read whole and checked.
ENDLESS = {"boardEvents"}
CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    # What the document calls invalid is refused: it says what is accepted, not more.
    negative_data_rejection,
    # With the token configured, every operation that declares it refuses a request without.
    ignored_auth,
    # A method the document does not list is a 405 naming those it does.
    unsupported_method,
]
# Not positive_data_acceptance: a `timestamp_ms` ahead of the server's clock is refused (422),
# a bound a document cannot state.
CONFIG = {
    "seed": 20261126,
    "generation": {"max-examples": 25, "deterministic": True, "database": "none"},
}


def example_call_id() -> str:
    """The call the document's examples name, so the examples phase finds it."""
    found: str = openapi_document()["components"]["parameters"]["CallId"]["example"]
    return found


def seed_example_call(stack: Stack) -> None:
    """An ended call with a record, and an active one, so lookups answer 200 with real bodies."""
    call_id = example_call_id()
    for payload in (
        event(call_id, "ringing", 1_515_859_261_381),
        event(call_id, "answered", 1_515_859_262_000),
        ended(call_id, 1_515_859_270_000, "USER_END_CALL", 8),
        event("call-vn-1-LIVE", "ringing", 1_515_859_261_381),
    ):
        assert stack.post(payload).status_code == 200
    wait_until(
        lambda: requests.get(f"{stack.web_url}/calls/{call_id}/record", headers=AUTH, timeout=5).ok,
        20,
        "the example call's record",
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack for every operation: each is a test of its own, and a stack takes seconds."""
    workdir = tmp_path_factory.mktemp("openapi")
    redis = RedisServer(workdir / "redis")
    redis.start()
    stack = Stack(redis, workdir, {"CALLSTATE_API_TOKEN": TOKEN})
    try:
        stack.start_web()
        stack.start_workers(1)
        seed_example_call(stack)
        yield stack
    finally:
        stack.stop()
        print(stack.logs())
        try:
            assert_stream_fits(redis.client())
        finally:
            redis.stop()


# Loaded from the package rather than from a running server: the lazy `from_fixture` loader
# needs pytest's removed `Node._nodeid` (pytest 9.2). What GET /openapi.json serves is this
# same document (tests/unit/test_apidoc.py), and it is one of the operations tested here.
api = schemathesis.openapi.from_dict(
    copy.deepcopy(openapi_document()), config=SchemathesisConfig.from_dict(CONFIG)
).exclude(operation_id=sorted(ENDLESS))


@api.parametrize()
def test_every_answer_conforms_to_the_document(case: Case[Any], stack: Stack) -> None:
    case.call_and_validate(base_url=stack.web_url, headers=AUTH, checks=CHECKS)


def test_the_document_names_the_skipped_operations() -> None:
    """A typo in the skip lists would silently test less."""
    operation_ids: set[Any] = {
        operation["operationId"]
        for path in openapi_document()["paths"].values()
        for method, operation in path.items()
        if method != "parameters"
    }
    assert operation_ids >= ENDLESS
