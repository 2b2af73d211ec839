"""The final record as a contract in the tests: every record the suites produce must fit the
JSON Schema the package ships (`callstate/schemas/record.schema.json`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, ParamSpec, cast

import jsonschema_rs
from jsonschema import Draft202012Validator
from redis import Redis

from callstate.apidoc import record_schema
from callstate.config import Settings
from callstate.connection import StreamRows

Draft202012Validator.check_schema(record_schema())
VALIDATOR = Draft202012Validator(record_schema())
# The reference implementation takes ~0.7 ms a record, a few seconds over the thousands of
# records the unit tests build; this one ~4 µs. Its verdict picks the records to explain.
FAST = jsonschema_rs.validator_for(record_schema())
P = ParamSpec("P")

# Records that did not fit, noted where they were made: a record is built inside the drainer's
# per-entry isolation, which would set an exception aside as `unprocessable` instead of failing
# the test, so tests/conftest.py fails the running test when this list is not empty.
violations: list[str] = []


def problems(record: Any) -> list[str]:
    """What is wrong with `record` against the schema, one line per error; empty when it fits."""
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(record)'}: {error.message}"
        for error in VALIDATOR.iter_errors(record)
    ]


def noting_violations(make: Callable[P, Any]) -> Callable[P, Any]:
    """`make` (a function returning a record or None), with every record it returns checked
    against the schema and any misfit noted in `violations`."""

    @functools.wraps(make)
    def checked(*args: P.args, **kwargs: P.kwargs) -> Any:
        record = make(*args, **kwargs)
        if record is not None and not FAST.is_valid(record):
            found = problems(record)
            noted = f"record of {record.get('call_id')!r}: {'; '.join(found)}"
            if found and noted not in violations:  # refresh_record's record is build_record's
                violations.append(noted)
        return record

    return checked


def stream_violations(client: Redis) -> list[str]:
    """Every record entry of the records stream that does not fit the schema, described."""
    found = []
    streams = client.scan_iter(match=f"{Settings.key_prefix}:{{s*}}:records", _type="stream")
    rows = [row for key in streams for row in cast(StreamRows, client.xrange(key))]
    for entry_id, fields in rows:
        record = json.loads(fields[b"record"])
        if not FAST.is_valid(record):
            found += [f"{entry_id.decode()}: {problem}" for problem in problems(record)]
    return found


def assert_stream_fits(client: Redis) -> None:
    """Every record published to the records stream fits the schema."""
    found = stream_violations(client)
    assert not found, "published records that do not fit record.schema.json:\n" + "\n".join(found)
