"""Property: whatever a sender posts, the answer is JSON and 2xx or 4xx, every stored event gets a
verdict, and the other calls of its shard keep being applied."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fakeredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callstate.config import Settings
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.store import Store
from callstate.web import create_app
from tests.factories import body, event

CALL = "call-vn-1-HOSTILE-1"
MACHINE = CallMachine()
SETTINGS = Settings(redis_url="redis://fake", embedded_redis=False, var_dir=Path("var"), shards=4)

text = st.text(
    st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from('\x00\ufeff"\\')),
    max_size=12,
)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)
leaves = st.one_of(st.none(), st.booleans(), numbers, text)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=12,
)
FIELDS = [
    "call_id",
    "call_status",
    "timestamp_ms",
    "from",
    "to",
    "duration",
    "answerDuration",
    "project_id",
    "recording_url",
    "clientCustomData",
    "serial",
]


def encoded(value: Any, ascii_only: bool) -> bytes:
    """JSON text as a sender's encoder may write it: lone surrogates escaped, or as raw bytes."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, arbitrary JSON, and realistic events with a field made hostile."""
    kind = draw(st.sampled_from(["bytes", "json", "field", "nesting", "splice"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    ascii_only = draw(st.booleans())
    if kind == "json":
        return encoded(draw(values), ascii_only)
    payload = event(CALL, draw(st.sampled_from(["ringing", "answered", "ended"])), 1_000)
    if kind == "field":
        name = draw(st.one_of(st.sampled_from(FIELDS), text))
        payload[name] = draw(values)
        return encoded(payload, ascii_only)
    if kind == "nesting":
        depth = draw(st.integers(min_value=1, max_value=3000))
        return body(payload)[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    prefix = draw(st.sampled_from([b"", b"\xef\xbb\xbf", b" \n"]))
    duplicate = b'{"call_status": ' + encoded(draw(values), ascii_only) + b", "
    return prefix + duplicate + body(payload)[1:]


def control_id(store: Store) -> str:
    shard = store.keys.shard_of(CALL)
    return next(f"control-{n}" for n in range(1000) if store.keys.shard_of(f"control-{n}") == shard)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(raw=hostile_bodies(), content_type=st.sampled_from(["application/json", "text/plain"]))
def test_any_body_gets_a_json_4xx_or_is_stored_and_applied(raw: bytes, content_type: str) -> None:
    redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    store = Store(redis, SETTINGS)
    client = create_app(SETTINGS, redis).test_client()
    drainer = Drainer(
        store, MACHINE, batch=50, slice_ms=60_000, linger_ms=0, window_ms=0, wake=print
    )

    response = client.post("/webhooks/stringee", data=raw, headers={"Content-Type": content_type})

    assert 200 <= response.status_code < 500, (response.status_code, response.data[:200])
    answer = response.get_json()
    assert isinstance(answer, dict)
    control = control_id(store)
    sent = client.post(
        "/webhooks/stringee",
        data=body(event(control, "ringing", 2_000)),
        headers={"Content-Type": "application/json"},
    )
    assert sent.status_code == 200
    for shard in range(SETTINGS.shards):
        drainer.drain(shard)
        assert not store.log.has_backlog(shard)
    if response.status_code == 200:
        doc = store.docs.get_doc(answer["call_id"])
        assert doc is not None
        assert answer["log_id"] in [item["log_id"] for item in doc["journal"]]
    else:
        assert answer["error"] and answer["message"]
    control_doc = store.docs.get_doc(control)
    assert control_doc is not None and control_doc["status"] == "ringing"
    assert store.quarantine.recent(5) == [] or response.status_code != 200
