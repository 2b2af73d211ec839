"""Call figures from final records: calls, answered, ASR, ACD, mean ring time, dispositions.

Pure and one pass: each group keeps only sums and counts, so any number of records is summed up
in constant memory per group. The definitions are the README's ("Call figures").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from callstate.calldoc import Record
from callstate.record import DISPOSITIONS, record_end_ms

GROUPINGS = ("hour", "day", "direction", "user")

HOUR_FORMAT = "%Y-%m-%dT%H:00:00Z"
DAY_FORMAT = "%Y-%m-%d"
RATIO_DIGITS = 4
SECONDS_DIGITS = 3  # the timeline's milliseconds


@dataclass
class Tally:
    """One group's running sums: what its figures are computed from."""

    calls: int = 0
    talk_seconds: float = 0.0
    talked_calls: int = 0
    ring_seconds: float = 0.0
    rung_calls: int = 0
    dispositions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DISPOSITIONS, 0))

    def add(self, record: Record) -> None:
        self.calls += 1
        disposition = record.get("disposition")
        key = disposition if disposition in self.dispositions else "unknown"
        self.dispositions[key] += 1
        if disposition != "answered":
            return
        talk = talk_seconds(record)
        if talk is not None:
            self.talk_seconds += talk
            self.talked_calls += 1
        ring = ring_seconds(record)
        if ring is not None:
            self.ring_seconds += ring
            self.rung_calls += 1

    def figures(self) -> dict[str, Any]:
        answered = self.dispositions["answered"]
        return {
            "calls": self.calls,
            "answered": answered,
            "asr": _ratio(answered, self.calls, RATIO_DIGITS),
            "acd_seconds": _ratio(self.talk_seconds, self.talked_calls, SECONDS_DIGITS),
            "mean_ring_seconds": _ratio(self.ring_seconds, self.rung_calls, SECONDS_DIGITS),
            "talk_seconds": round(self.talk_seconds, SECONDS_DIGITS),
            "dispositions": dict(self.dispositions),
        }


def call_kpis(records: Iterable[Record], group_by: str | None = None) -> dict[str, Any]:
    """The figures of `records` in total and, with `group_by` (one of GROUPINGS), per group,
    groups sorted by key (the group of records without a key last)."""
    if group_by is not None and group_by not in GROUPINGS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPINGS)}")
    total = Tally()
    groups: dict[str | None, Tally] = {}
    for record in records:
        total.add(record)
        if group_by is not None:
            groups.setdefault(group_key(record, group_by), Tally()).add(record)
    return {
        "group_by": group_by,
        "total": total.figures(),
        "groups": [{"key": key, **groups[key].figures()} for key in sorted(groups, key=_order)],
    }


def group_key(record: Record, group_by: str) -> str | None:
    """The record's group: the UTC hour or day of its end, its direction, or its user; None
    when it has none (no timeline, or a null or empty `request_from_user_id`)."""
    if group_by in ("hour", "day"):
        end = record_end_ms(record)
        if end is None:
            return None
        moment = datetime.fromtimestamp(end / 1000, tz=UTC)
        return moment.strftime(HOUR_FORMAT if group_by == "hour" else DAY_FORMAT)
    value = record.get("direction" if group_by == "direction" else "request_from_user_id")
    return value if isinstance(value, str) and value else None


def talk_seconds(record: Record) -> float | None:
    """An answered call's talk time: the provider's `answerDuration` (seconds), else the
    timeline from `answered` to `ended`; None when neither is known."""
    answer = record.get("answerDuration")
    if isinstance(answer, int) and not isinstance(answer, bool):
        return float(answer)
    return _span_seconds(record, "answered", "ended")


def ring_seconds(record: Record) -> float | None:
    """From the call's first `ringing` to its `answered`; None unless both are in the timeline,
    in that order."""
    return _span_seconds(record, "ringing", "answered")


def _span_seconds(record: Record, first: str, last: str) -> float | None:
    timeline = record.get("timeline") or {}
    start, end = timeline.get(first), timeline.get(last)
    if not isinstance(start, int) or not isinstance(end, int) or end < start:
        return None
    return (end - start) / 1000


def _ratio(part: float, whole: int, digits: int) -> float | None:
    """part / whole, None (not 0) when there is nothing to divide by."""
    return round(part / whole, digits) if whole else None


def _order(key: str | None) -> tuple[bool, str]:
    return key is None, key or ""
