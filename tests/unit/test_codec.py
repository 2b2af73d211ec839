"""The storage codec: lossless, smaller, and plain JSON still reads."""

from __future__ import annotations

import json

from callstate.codec import pack, unpack
from tests.factories import body, ended, event, example


def test_round_trip_is_byte_for_byte() -> None:
    for raw in (body(example("started")), b'{"call_id":"x"}', '{"a": "đã gọi"}'.encode(), b""):
        assert unpack(pack(raw)) == raw


def test_plain_json_passes_through() -> None:
    raw = body(event("c-1", "ringing", 1))
    assert unpack(raw) == raw


def test_typical_events_shrink_to_well_under_half() -> None:
    payloads = [
        body(
            event(
                f"call-vn-1-Q{n}",
                "ringing",
                1_700_000_000_000 + n,
                to={"number": f"849{n:08d}", "alias": f"849{n:08d}"},
            )
        )
        for n in range(50)
    ] + [body(ended("call-vn-1-Z", 1, "486 Busy Here", 0))]
    raw_size = sum(map(len, payloads))
    packed_size = sum(len(pack(p)) for p in payloads)
    assert packed_size < raw_size * 0.4
    assert json.loads(unpack(pack(payloads[0]))) == json.loads(payloads[0])
