"""The records history over HTTP: search with cursor paging, CSV or JSON Lines export, and the
call figures summed up from it."""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from flask import Blueprint, Response, jsonify, request, stream_with_context

from callstate.calldoc import Record
from callstate.export import csv_lines, jsonl_lines
from callstate.history import Filters, is_member
from callstate.http import error, require_read_token, services
from callstate.kpis import GROUPINGS, call_kpis
from callstate.moments import iso_utc, parse_time_ms
from callstate.record import DIRECTIONS, DISPOSITIONS

DEFAULT_PAGE = 50
MAX_PAGE = 500
MAX_TEXT = 128
MAX_CURSOR = 400
LINES_PER_WRITE = 200
# A figures request reads every record of its window in the request (about 10,000 a second):
# a wider window is refused rather than hold a web thread for minutes.
MAX_FIGURES_RECORDS = 200_000
DAY_MS = 86_400_000
# ASCII digits only: str.isdigit() also takes "²", which int() then refuses.
_DIGITS = re.compile(r"[0-9]{1,10}")

history = Blueprint("history", __name__)
history.before_request(require_read_token)


class BadParameterError(ValueError):
    """A query parameter that cannot be used; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Search:
    """A search's time range on end times, [since_ms, until_ms), and its filters."""

    since_ms: int
    until_ms: int | None
    filters: Filters


@history.get("/records")
def search_records() -> tuple[Response, int]:
    try:
        search = _search()
        limit = _limit()
        after = _cursor()
    except BadParameterError as exc:
        return error(400, "invalid_query", str(exc), field=exc.field)
    page = services().store.history.page(
        search.since_ms, search.until_ms, search.filters, limit, after
    )
    next_cursor = encode_cursor(page.next_after) if page.next_after else None
    return jsonify({"records": page.records, "next_cursor": next_cursor}), 200


@history.get("/records.csv")
def export_csv() -> Response | tuple[Response, int]:
    return _export(csv_lines, "text/csv", "records.csv")


@history.get("/records.jsonl")
def export_jsonl() -> Response | tuple[Response, int]:
    return _export(jsonl_lines, "application/x-ndjson", "records.jsonl")


@history.get("/stats/calls")
def call_figures() -> tuple[Response, int]:
    """The call figures of the records that end in the window (by default the day before
    `until`, or before now)."""
    try:
        search = _search(default_window_ms=DAY_MS)
        group_by = _choice("group_by", GROUPINGS)
    except BadParameterError as exc:
        return error(400, "invalid_query", str(exc), field=exc.field)
    history_ = services().store.history
    if (
        history_.count_at_most(search.since_ms, search.until_ms, search.filters)
        > MAX_FIGURES_RECORDS
    ):
        message = f"the window holds more than {MAX_FIGURES_RECORDS} records: narrow it"
        return error(400, "invalid_query", message, field="since")
    records = history_.iter_records(search.since_ms, search.until_ms, search.filters)
    figures = call_kpis(records, group_by)
    figures.update(since=iso_utc(search.since_ms), until=iso_utc(search.until_ms))
    return jsonify(figures), 200


def _now_ms() -> int:
    return int(time.time() * 1000)


Lines = Callable[[Iterable[Record]], Iterator[str]]


def _export(lines: Lines, mimetype: str, filename: str) -> Response | tuple[Response, int]:
    """Every matching record, newest first, streamed as it is read: memory stays that of one
    step of the walk, whatever the range holds."""
    try:
        search = _search()
    except BadParameterError as exc:
        return error(400, "invalid_query", str(exc), field=exc.field)
    found = services().store.history.iter_records(search.since_ms, search.until_ms, search.filters)
    response = Response(stream_with_context(_joined(lines(found))), mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _joined(lines: Iterator[str]) -> Iterator[str]:
    """Lines sent `LINES_PER_WRITE` at a time: one write per line would cost a system call each."""
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == LINES_PER_WRITE:
            yield "".join(chunk)
            chunk.clear()
    if chunk:
        yield "".join(chunk)


def encode_cursor(member: str) -> str:
    return base64.urlsafe_b64encode(member.encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> str:
    """The member a cursor stands for; ValueError for what no page gave."""
    if len(raw) > MAX_CURSOR or not raw.isascii():
        raise ValueError(raw)
    try:
        member = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError(raw) from None
    if not is_member(member):
        raise ValueError(raw)
    return member


def _search(default_window_ms: int | None = None) -> Search:
    """The query's range and filters; without `since`, from the beginning, or with
    `default_window_ms` that long before `until` (now when not given)."""
    since = _time("since")
    until_ms = _time("until")
    if since is not None:
        since_ms = since
    elif default_window_ms is None:
        since_ms = 0
    else:
        since_ms = max(0, (_now_ms() if until_ms is None else until_ms) - default_window_ms)
    if until_ms is not None and until_ms <= since_ms:
        raise BadParameterError("until", "until must be later than since")
    filters = Filters(
        disposition=_choice("disposition", DISPOSITIONS),
        direction=_choice("direction", DIRECTIONS),
        number=_text("number"),
        user=_text("user"),
    )
    return Search(since_ms, until_ms, filters)


def _time(name: str) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        return parse_time_ms(raw)
    except ValueError as exc:
        raise BadParameterError(name, f"{name}: {exc}") from None


def _choice(name: str, allowed: tuple[str, ...]) -> str | None:
    raw = request.args.get(name)
    if raw is not None and raw not in allowed:
        raise BadParameterError(name, f"{name} must be one of {', '.join(allowed)}")
    return raw


def _text(name: str) -> str | None:
    raw = request.args.get(name)
    if raw is not None and len(raw) > MAX_TEXT:
        raise BadParameterError(name, f"{name} is at most {MAX_TEXT} characters")
    return raw or None


def _limit() -> int:
    raw = request.args.get("limit")
    if raw is None:
        return DEFAULT_PAGE
    if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= MAX_PAGE:
        raise BadParameterError("limit", f"limit must be an integer between 1 and {MAX_PAGE}")
    return int(raw)


def _cursor() -> str | None:
    raw = request.args.get("cursor")
    if raw is None:
        return None
    try:
        return decode_cursor(raw)
    except ValueError:
        raise BadParameterError("cursor", "cursor must be a next_cursor a page gave") from None
