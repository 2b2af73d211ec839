"""Redis stream ids (`<ms>-<seq>`), parsed and compared in this one place."""

from __future__ import annotations

StreamId = tuple[int, int]


def parse(log_id: str) -> StreamId:
    """Stream ids compare as (ms, seq) pairs, not as strings."""
    ms, _, seq = log_id.partition("-")
    return int(ms), int(seq or 0)


def millis(log_id: str) -> int:
    """The Redis server's clock, in ms, when the entry was added."""
    return parse(log_id)[0]


def text(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


def following(log_id: str) -> str:
    """The smallest id after `log_id`: XTRIM's MINID keeps it and drops everything before."""
    ms, seq = parse(log_id)
    return text((ms, seq + 1))


def latest(*log_ids: str | None) -> str | None:
    """The latest of the given ids, ignoring None."""
    present = [log_id for log_id in log_ids if log_id is not None]
    return max(present, key=parse) if present else None
