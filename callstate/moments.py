"""Moments as the API and the command line take and show them: Unix milliseconds or ISO 8601."""

from __future__ import annotations

from datetime import UTC, datetime

LATEST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last time ISO 8601 can write


def parse_time_ms(raw: str) -> int:
    """Unix milliseconds, or an ISO 8601 time (UTC when it names no offset); ValueError saying
    what is accepted otherwise."""
    if raw.isascii() and raw.isdigit():
        if int(raw) > LATEST_MS:
            raise ValueError(f"Unix milliseconds up to {LATEST_MS}, not {raw!r}")
        return int(raw)
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(
            f"an ISO 8601 time (2026-11-25T16:00:00Z) or Unix milliseconds, not {raw!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    found = int(moment.timestamp() * 1000)
    if found > LATEST_MS:  # 9999-12-31T23:59:59-01:00 is in year 10000 in UTC
        raise ValueError(f"a time up to 9999-12-31T23:59:59.999Z, not {raw!r}")
    return max(0, found)


def iso_utc(ms: object) -> str | None:
    """A Unix time in ms as ISO 8601 UTC to the millisecond (`2026-11-25T16:00:00.000Z`);
    None for what is not one."""
    if not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms <= LATEST_MS:
        return None
    moment = datetime.fromtimestamp(ms // 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
