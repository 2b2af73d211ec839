"""What moving a store costs: `python -m bench.transfer`.

One real Redis server gets `--calls` calls through the webhook's append and the drainers'
commit on `--from` shards (a third ended, with records; the others active, 3 events each); the
store is exported to a file, imported into a second server with `--to` shards, and checked
with `rebuild --check` there. Each step is timed once, in one process; figures to
`bench/results/transfer-*.json`.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.results_file import write_figures
from bench.run import machine
from callstate.config import Settings
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.rebuild import check
from callstate.store import Store
from callstate.transfer import export_store, import_store
from tests.factories import body, ended, event
from tests.integration.stack import RedisServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=30_000)
    parser.add_argument("--from", dest="source_shards", type=int, default=4)
    parser.add_argument("--to", dest="target_shards", type=int, default=16)
    return parser.parse_args(argv)


def fill(store: Store, calls: int) -> int:
    """Calls through the real append and commit; return how many entries were logged."""
    drainer = Drainer(
        store, CallMachine(), batch=500, slice_ms=60_000, linger_ms=0, window_ms=0, wake=_no_wake
    )
    logged = 0
    for n in range(calls):
        call_id = f"move-{n}"
        payloads = [event(call_id, "ringing", 1_000), event(call_id, "answered", 2_000)]
        payloads.append(
            ended(call_id, 3_000, "USER_END_CALL", 5)
            if n % 3 == 0
            else event(call_id, "answered", 2_000)  # a delivery again
        )
        for payload in payloads:
            store.log.append_event(call_id, body(payload))
        logged += len(payloads)
    for shard in range(store.settings.shards):
        drainer.drain(shard)
    return logged


def _no_wake(shard: int) -> None:
    """The drains here run to the end in this process: nothing to wake."""


def timed(step: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    found = step()
    return found, round(time.perf_counter() - started, 2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="callstate-transfer-"))
    servers = [RedisServer(workdir / name, fsync="everysec") for name in ("source", "target")]
    for server in servers:
        server.start()
    try:
        stores = [
            Store(
                server.client(),
                Settings(redis_url=server.url, embedded_redis=False, var_dir=workdir, shards=n),
            )
            for server, n in zip(servers, (args.source_shards, args.target_shards), strict=True)
        ]
        logged = fill(stores[0], args.calls)
        exported = workdir / "store.jsonl"
        with exported.open("w", encoding="ascii") as out:
            _, export_s = timed(lambda: export_store(stores[0], out))
        with exported.open(encoding="ascii") as lines:
            _, import_s = timed(lambda: import_store(stores[1], lines))
        report, check_s = timed(lambda: check(stores[1], CallMachine()))
        memory = [int(s.redis.info("memory")["used_memory"]) for s in stores]
    finally:
        for server in servers:
            server.stop()
    return {
        "machine": machine(),
        "args": vars(args),
        "log_entries": logged,
        "file_bytes": exported.stat().st_size,
        "redis_used_memory": {"source": memory[0], "target": memory[1]},
        "seconds": {"export": export_s, "import": import_s, "rebuild_check": check_s},
        "check": {"compared": report.compared, "differing": len(report.differing)},
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def main(argv: list[str] | None = None) -> int:
    figures = run(parse_args(argv))
    for name in ("log_entries", "file_bytes", "redis_used_memory", "seconds", "check"):
        print(f"{name}: {figures[name]}")
    print(write_figures("transfer", figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
