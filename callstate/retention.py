"""How long callstate keeps each thing, all from `CALLSTATE_RETENTION_SECONDS` and the snapshot
interval: the one place to read before changing either."""

from __future__ import annotations

from dataclasses import dataclass

from callstate.config import Settings


@dataclass(frozen=True)
class Retention:
    """The log keeps `log_ms` of entries (a snapshot covers what is older, up to an interval
    later); a call silent that long, and not active, is retired; its id is then refused for as
    long again, while its tombstone lasts."""

    log_ms: int
    snapshot_interval_ms: int

    @classmethod
    def of(cls, settings: Settings) -> Retention:
        return cls(settings.retention_seconds * 1000, settings.snapshot_interval_seconds * 1000)

    def snapshot_before(self, now_ms: int) -> int:
        """Entries logged before this may be covered by a snapshot and trimmed."""
        return now_ms - self.log_ms

    def snapshot_due(self, first_entry_ms: int, now_ms: int) -> bool:
        """Whether a shard's log has grown an interval older than retention."""
        return first_entry_ms < self.snapshot_before(now_ms) - self.snapshot_interval_ms

    def refused_until(self, last_change_ms: int) -> int:
        """Until when events for a retired call are refused (`rejected: expired`)."""
        return last_change_ms + 2 * self.log_ms

    def tombstone_expires(self, last_change_ms: int) -> int:
        """A tombstone outlasts every log entry it may have refused: one retention and an
        interval until that entry is covered, one retention more for maintenance running late."""
        return self.refused_until(last_change_ms) + 2 * self.log_ms + self.snapshot_interval_ms

    def tombstone_expires_after(self, reopened_ms: int) -> int:
        """A tombstone a new call under the same id numbered its revisions from lasts until that
        call's first entry is covered by a snapshot (whose copy then carries the numbering), with
        one retention more for maintenance running late."""
        return reopened_ms + 2 * self.log_ms + self.snapshot_interval_ms

    def document_ttl_ms(self) -> int:
        """An ended call is retired once its last entry is older than retention and an interval;
        its TTL, one retention longer, only frees memory if maintenance stops."""
        return 2 * self.log_ms + self.snapshot_interval_ms
