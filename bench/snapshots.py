"""What snapshots cost with 200,000 stored calls, on a real Redis server: `rebuild --check`,
`rebuild`, and moving the snapshots over the whole log (retiring every call), with time, the
process's peak memory and Redis' memory. `python -m bench.snapshots [--calls N]`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.results_file import write_figures
from callstate.config import Settings
from callstate.drain import Drainer
from callstate.eventlog import event_fields
from callstate.machine import CallMachine
from callstate.rebuild import check, rebuild
from callstate.snapshots import Snapshots
from callstate.store import Store
from tests.factories import ended, event
from tests.integration.stack import RedisServer

RETENTION_SECONDS = 7 * 24 * 3600


def fill(store: Store, calls: int, first_ms: int, late_ms: int, late_share: int) -> None:
    """Log `calls` calls (ringing, then ended) a second apart, as if received then; every
    `late_share`-th call also gets a recording notice from `late_ms` on."""
    pipe = store.redis.pipeline(transaction=False)
    for n in range(calls):
        call_id = f"bench-{n}"
        shard = store.keys.shard_of(call_id)
        at = first_ms + n * 1000
        for offset, payload in (
            (0, event(call_id, "ringing", at)),
            (500, ended(call_id, at + 400, "USER_END_CALL", 30)),
        ):
            fields = event_fields(call_id, json.dumps(payload).encode())
            pipe.xadd(store.keys.log(shard), fields, id=f"{at + offset}-{n % 1000}")
        if len(pipe) >= 5000:
            pipe.execute()
    for n in range(0, calls, late_share):
        call_id = f"bench-{n}"
        notice = {"call_id": call_id, "type": "recording", "recording_url": f"https://r/{n}"}
        fields = event_fields(call_id, json.dumps(notice).encode())
        pipe.xadd(store.keys.log(store.keys.shard_of(call_id)), fields, id=f"{late_ms + n}-0")
    pipe.execute()


def timed(what: str, figures: dict[str, Any], step: Any) -> Any:
    started = time.perf_counter()
    result = step()
    figures[what] = {
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(what, figures[what], flush=True)
    return result


def redis_mib(store: Store) -> float:
    return round(int(store.redis.info("memory")["used_memory"]) / 2**20, 1)


def run(calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir) / "redis", fsync="everysec")
        server.start()
        try:
            settings = dataclasses.replace(
                Settings.from_env({"REDIS_URL": server.url}), retention_seconds=RETENTION_SECONDS
            )
            store = Store(server.client(), settings)
            return measure(store, calls)
        finally:
            server.stop()


def measure(store: Store, calls: int) -> dict[str, Any]:
    machine = CallMachine()
    figures: dict[str, Any] = {"calls": calls}
    now_ms = store.log.server_time_ms()
    before_ms = now_ms - RETENTION_SECONDS * 1000
    # Every call ended before the trim point; one in a hundred gets a notice an hour after it.
    fill(store, calls, before_ms - calls * 1000 - 7_200_000, before_ms + 3_600_000, 100)
    drainer = Drainer(store, machine, 500, 600_000, 0, 0, lambda shard: None)
    for shard in range(store.settings.shards):
        timed(f"apply shard {shard}", figures, lambda s=shard: drainer.drain(s))
    figures["redis_mib_stored"] = redis_mib(store)
    report = timed("check", figures, lambda: check(store, machine))
    figures["check_differing"] = len(report.differing)
    report = timed("rebuild", figures, lambda: rebuild(store, machine))
    figures["rebuild_rewritten"] = report.rewritten
    snapshots = Snapshots(store, machine)

    def advance_all() -> int:
        steps = 0
        for shard in range(store.settings.shards):
            while (step := snapshots.advance(shard, before_ms)) is not None and step.entries:
                steps += 1
        return steps

    figures["advance_steps"] = timed("advance", figures, advance_all)
    figures["calls_kept_in_snapshots"] = sum(
        int(store.redis.hlen(store.keys.snapshot(shard))) for shard in range(store.settings.shards)
    )
    figures["calls_stored_after"] = len(store.docs.all_call_ids())
    figures["redis_mib_after_advance"] = redis_mib(store)
    figures["records_stream_mib"] = round(
        sum(
            int(store.redis.memory_usage(store.keys.records(shard)) or 0)
            for shard in range(store.settings.shards)
        )
        / 2**20,
        1,
    )
    figures["bytes_per_tombstone"] = store.redis.memory_usage(store.keys.tombstone("bench-1"))
    report = timed("check after advance", figures, lambda: check(store, machine))
    figures["check_differing_after_advance"] = len(report.differing)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    figures = run(parser.parse_args(argv).calls)
    write_figures("snapshots", figures)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
