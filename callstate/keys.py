"""Every Redis key name callstate uses is built here and nowhere else.

Everything a shard's commit writes carries the shard's hash tag (`cs:{s3}:log`,
`cs:{s3}:call:<id>`): on Redis Cluster a shard's keys share one slot, so a commit, a transaction
or a script touches one server. Views across shards (the active calls, the records) are read per
shard and merged. Only the quarantine and its counter, written alone by the webhook, are global.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key builder for one deployment: a prefix and a fixed number of event-log shards."""

    prefix: str
    shards: int

    def shard_of(self, call_id: str) -> int:
        """The shard that owns a call; crc32 is stable across processes, unlike hash()."""
        return zlib.crc32(call_id.encode()) % self.shards

    def tag(self, shard: int) -> str:
        """The start of every key of the shard: its hash tag keeps them in one cluster slot."""
        return f"{self.prefix}:{{s{shard}}}"

    def log(self, shard: int) -> str:
        """The shard's event log: a Stream, the source of truth."""
        return f"{self.tag(shard)}:log"

    def cursor(self, shard: int) -> str:
        """Id of the last log entry of the shard whose effects are committed."""
        return f"{self.tag(shard)}:cursor"

    def drain_lock(self, shard: int) -> str:
        return f"{self.tag(shard)}:drain-lock"

    def drain_lock_wanted(self, shard: int) -> str:
        """Set while a snapshot step, a trim or a rebuild waits for the shard's drain lock:
        drain jobs hand the shard over at their next slice's end and do not take it meanwhile."""
        return f"{self.tag(shard)}:drain-lock-wanted"

    def wake(self, shard: int) -> str:
        """The shard's wake flag: set while a drain job for it is queued and not yet started.
        Only whoever sets it queues a job, so a shard never has two queued."""
        return f"{self.tag(shard)}:wake"

    def call(self, call_id: str) -> str:
        return self._per_call("call", call_id)

    def _per_call(self, kind: str, call_id: str) -> str:
        return f"{self.tag(self.shard_of(call_id))}:{kind}:{call_id}"

    def per_call_pattern(self, kind: str) -> str:
        """Every shard's keys of one call each, `call` or `tombstone`, for SCAN."""
        return f"{self.prefix}:{{s*}}:{kind}:*"

    def per_call_id(self, kind: str, key: str) -> str | None:
        """The call whose key of `kind` `key` is, or None: the pattern's `*` matches `}` too, so
        an index key whose number or user id holds `}:call:` matches it, and only a key built
        back the same is a call's."""
        _, found, call_id = key.partition(f"}}:{kind}:")
        return call_id if found and self._per_call(kind, call_id) == key else None

    def active(self, shard: int) -> str:
        """Sorted set of the shard's calls not yet ended, scored by the time their last event
        was logged."""
        return f"{self.tag(shard)}:active"

    def active_by(self, shard: int, kind: str, value: str) -> str:
        """The shard's active calls by `number` (from or to) or by `user`
        (request_from_user_id)."""
        return f"{self.tag(shard)}:active:{kind}:{value}"

    def active_index_pattern(self, shard: int) -> str:
        return f"{self.tag(shard)}:active:*"

    def records(self, shard: int) -> str:
        """Stream of the final call records the shard's commits publish, for downstream
        consumers (`callstate/recordstream.py` reads every shard's at once)."""
        return f"{self.tag(shard)}:records"

    def history(self, shard: int) -> str:
        """Hash of the shard's calls to the latest revision of their record, packed, kept for
        the record retention (`callstate/history.py`)."""
        return f"{self.tag(shard)}:history"

    def history_by_end(self, shard: int) -> str:
        """The shard's record history by end time: members `<end ms, 13 digits>:<call_id>`,
        all scored 0, so a range BYLEX is in time order."""
        return f"{self.tag(shard)}:history-end"

    def history_by(self, shard: int, kind: str, value: str) -> str:
        """The shard's record history by `number` (from or to) or by `user`
        (request_from_user_id), members as in `history_by_end`."""
        return f"{self.tag(shard)}:history-{kind}:{value}"

    def logged_counter(self, shard: int) -> str:
        """Entries appended to the shard's log (events and sweeper requests), counted by the
        append itself."""
        return f"{self.tag(shard)}:stats:logged"

    def applied_counter(self, shard: int) -> str:
        """Entries of the shard's log applied, counted in the commit that applies them."""
        return f"{self.tag(shard)}:stats:applied"

    def verdicts(self, shard: int) -> str:
        """Hash of the shard's applied entries by `verdict` or `verdict:reason`."""
        return f"{self.tag(shard)}:stats:verdicts"

    def records_counter(self, shard: int) -> str:
        """Record revisions the shard's commits published."""
        return f"{self.tag(shard)}:stats:records"

    def active_statuses(self, shard: int) -> str:
        """Hash of the shard's active calls counted by status, kept by its commits."""
        return f"{self.tag(shard)}:stats:active"

    def drain_seconds(self, shard: int) -> str:
        """Hash of the shard's drain job durations: a count per histogram bucket, sum, count."""
        return f"{self.tag(shard)}:stats:drain-seconds"

    def apply_lag(self, shard: int) -> str:
        """Hash of the shard's apply lags (append to commit, Redis' clock): events per bucket."""
        return f"{self.tag(shard)}:stats:apply-lag"

    def quarantined_counter(self) -> str:
        """Deliveries ever quarantined (the quarantine list itself is bounded)."""
        return f"{self.prefix}:stats:quarantined"

    def snapshot(self, shard: int) -> str:
        """Hash of the shard's calls that straddle its snapshot position, as of that position:
        with the log after it, they re-derive every call the store holds."""
        return f"{self.tag(shard)}:snapshot"

    def snapshot_position(self, shard: int) -> str:
        """Id of the last log entry the shard's snapshot covers; the log is trimmed up to it."""
        return f"{self.tag(shard)}:snapshot-position"

    def tombstone(self, call_id: str) -> str:
        """What is kept of a retired call: its last record revision, and until when its id is
        refused, so no later event publishes a conflicting revision."""
        return self._per_call("tombstone", call_id)

    def everything(self) -> str:
        """Every key of the deployment, for SCAN: whether a store is empty."""
        return f"{self.prefix}:*"

    def import_marker(self) -> str:
        """Set while `callstate import-store` writes a store: the service refuses to start on a
        store half written."""
        return f"{self.prefix}:import"

    def quarantine(self) -> str:
        return f"{self.prefix}:quarantine"

    def board_channel(self, shard: int) -> str:
        """Pub/sub channel on which the shard's commits publish what the live board shows."""
        return f"{self.tag(shard)}:board"

    def board_rejections(self, shard: int) -> str:
        """List of the shard's latest rejected events, newest first, capped, for the board."""
        return f"{self.tag(shard)}:board-rejections"

    # Record forwarding (callstate/forwarding.py), per shard like everything a commit writes.

    def outbox(self, shard: int) -> str:
        """Stream of the shard's record revisions still to be handed to the forwarder; written
        in the commit that publishes them, so a revision is never committed without its
        delivery owed."""
        return f"{self.tag(shard)}:outbox"

    def forward_wake(self, shard: int) -> str:
        """The shard's forwarder wake flag: set while a forward job for it is queued."""
        return f"{self.tag(shard)}:forward-wake"

    def forward_lock(self, shard: int) -> str:
        return f"{self.tag(shard)}:forward-lock"

    def forward_chains(self, shard: int) -> str:
        """Hash `destination:call_id` -> id of the last delivery job queued for that pair: the
        next revision's delivery waits for it (per-call order)."""
        return f"{self.tag(shard)}:forward-chains"

    def forward_pending(self, shard: int) -> str:
        """Hash of the deliveries handed to RQ jobs, by job id: what to send, and where."""
        return f"{self.tag(shard)}:forward-pending"

    def dead_letters(self, shard: int) -> str:
        """List of deliveries that failed for the whole retry schedule, newest first."""
        return f"{self.tag(shard)}:dead-letters"

    def deliveries_moved(self, shard: int) -> str:
        """While `callstate migrate-keys` moves the shard's dead letters and counts from the data
        Redis to the queue's: on the queue's, the move (its id, what it copied) until the data
        side is cleared; on the data Redis, the id of the move it was cleared for."""
        return f"{self.tag(shard)}:deliveries-moved"

    def forward_counters(self, shard: int) -> str:
        """The shard's forwarding counts: `delivered`, `failed` (attempts), `dead_lettered`."""
        return f"{self.tag(shard)}:stats:forwarding"
