"""The call document's shape: what a drainer stores for each call, declared once."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

Record = dict[str, Any]


class Leg(TypedDict):
    """One agent's attempt: opened by ringing (or a bare answer), closed by an end."""

    to_number: str | None
    user: str | None
    ringing_ms: int | None
    answered_ms: int | None
    ended_ms: int | None


class JournalEntry(TypedDict):
    """One log entry's verdict on the call, in log order."""

    log_id: str
    verdict: str
    reason: str | None
    call_status: Any
    timestamp_ms: Any
    error: NotRequired[str]


class Overflow(TypedDict):
    """The entries past the journal's bound: counted, with the range of their log ids."""

    reason: str
    count: int
    first_log_id: str
    last_log_id: NotRequired[str]


class CallDoc(TypedDict):
    """A call's state, fields, timeline, legs, verdict counts, journal and record."""

    call_id: str
    status: str | None
    fields: dict[str, Any]
    timeline: dict[str, int]
    last_timestamp_ms: int | None
    last_received_ms: int | None
    version: int
    counts: dict[str, int]
    seen: list[str]
    legs: list[Leg]
    closed_by: str | None
    swept_from: str | None
    journal: list[JournalEntry]
    record: Record | None
    overflow: NotRequired[Overflow]
    project: NotRequired[int]
    bytes: NotRequired[int]
    actors: NotRequired[dict[str, str]]
    first_revision: NotRequired[int]
