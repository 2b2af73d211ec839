"""Records as export lines: CSV with a fixed set of columns, safe to open in a spreadsheet, and
JSON Lines with every field."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from callstate.calldoc import Record
from callstate.codec import dumps
from callstate.history import record_user
from callstate.moments import iso_utc
from callstate.record import record_end_ms

# What a spreadsheet reads as the start of a formula, in ASCII and in full width (some locales
# convert those); the provider fills most cells, so any of them may start with one.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def _start_ms(record: Record) -> int | None:
    points = [p for p in _timeline(record).values() if isinstance(p, int)]
    return min(points) if points else None


def _answer_ms(record: Record) -> Any:
    return _timeline(record).get("answered")


def _timeline(record: Record) -> dict[str, Any]:
    timeline = record.get("timeline")
    return timeline if isinstance(timeline, dict) else {}


def _number(record: Record, party: str) -> Any:
    value = record.get(party)
    return value.get("number") if isinstance(value, dict) else None


def _agent(record: Record) -> Any:
    """The agent who answered, else the last one the call rang."""
    legs = [leg for leg in record.get("legs") or [] if isinstance(leg, dict)]
    answered = [leg for leg in legs if leg.get("outcome") == "answered"]
    chosen = answered[-1] if answered else (legs[-1] if legs else None)
    return chosen.get("agent") if chosen else None


Column = tuple[str, Callable[[Record], Any]]
CSV_COLUMNS: tuple[Column, ...] = (
    ("call_id", lambda r: r.get("call_id")),
    ("revision", lambda r: r.get("revision")),
    ("start_time", lambda r: iso_utc(_start_ms(r))),
    ("start_ms", _start_ms),
    ("answer_time", lambda r: iso_utc(_answer_ms(r))),
    ("answer_ms", _answer_ms),
    ("end_time", lambda r: iso_utc(record_end_ms(r))),
    ("end_ms", record_end_ms),
    ("direction", lambda r: r.get("direction")),
    ("disposition", lambda r: r.get("disposition")),
    ("from_number", lambda r: _number(r, "from")),
    ("to_number", lambda r: _number(r, "to")),
    ("user", record_user),
    ("agent", _agent),
    ("duration", lambda r: r.get("duration")),
    ("answerDuration", lambda r: r.get("answerDuration")),
    ("endCallCause", lambda r: r.get("endCallCause")),
    ("sip_code", lambda r: r.get("sip_code")),
    ("endedBy", lambda r: r.get("endedBy")),
    ("closed_by", lambda r: r.get("closed_by")),
    ("callCreatedReason", lambda r: r.get("callCreatedReason")),
    ("project_id", lambda r: r.get("project_id")),
    ("account_sid", lambda r: r.get("account_sid")),
    ("recording_url", lambda r: r.get("recording_url")),
)


def safe_cell(value: Any) -> str | int | float:
    """A cell's value: numbers as they are, text prefixed with `'` when a spreadsheet would
    take it for a formula (leading blanks included), anything else as its JSON text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return value
    cell = value if isinstance(value, str) else dumps(value)
    if cell.lstrip(" ").startswith(FORMULA_STARTS):
        return "'" + cell
    return cell


def csv_row(record: Record) -> list[str | int | float]:
    return [safe_cell(extract(record)) for _, extract in CSV_COLUMNS]


def csv_lines(records: Iterable[Record]) -> Iterator[str]:
    """The header, then one CSV line per record (RFC 4180: CRLF, quoted where needed)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def line(row: list[Any]) -> str:
        writer.writerow(row)
        out = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return out

    yield line([name for name, _ in CSV_COLUMNS])
    for record in records:
        yield line(csv_row(record))


def jsonl_lines(records: Iterable[Record]) -> Iterator[str]:
    """One record per line, every field, as stored."""
    for record in records:
        yield dumps(record) + "\n"
