"""What reading across shards costs, by number of shards: `python -m bench.fanout`.

Since every shard keeps its own active calls and records stream, the active-call lookups, the
sweeper's query and the latest records read each shard's keys (one pipelined round trip) and
merge. For each shard count, one real Redis server gets the same calls through the real commit
path (`--calls` active, a tenth of them sharing one number, and `--ended` ended ones with
records); each read is then timed `--reads` times, in rounds alternating the shard counts so
the machine's drift hits all alike. Figures (medians, ms) to `bench/results/fanout-*.json`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.results_file import write_figures
from bench.run import machine
from callstate import recordstream
from callstate.config import Settings
from callstate.drain import Drainer
from callstate.machine import CallMachine
from callstate.store import Store
from tests.factories import body, ended, event
from tests.integration.stack import RedisServer

SHARED_NUMBER = "84900000001"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--calls", type=int, default=5000, help="active calls")
    parser.add_argument("--ended", type=int, default=2000, help="ended calls (records)")
    parser.add_argument("--reads", type=int, default=100, help="timed reads per round")
    parser.add_argument("--rounds", type=int, default=4)
    return parser.parse_args(argv)


def fill(store: Store, calls: int, ended_calls: int) -> None:
    """Active and ended calls through the webhook's append and the drainers' commit."""
    drainer = Drainer(
        store, CallMachine(), batch=200, slice_ms=60_000, linger_ms=0, window_ms=0, wake=_no_wake
    )
    for n in range(calls + ended_calls):
        call_id = f"fan-{n}"
        caller = SHARED_NUMBER if n % 10 == 0 else f"8491{n:07d}"
        parties = {"from": _party(caller), "to": _party(f"8492{n:07d}")}
        store.log.append_event(call_id, body(event(call_id, "ringing", 1_000 + n, **parties)))
        if n >= calls:
            store.log.append_event(call_id, body(ended(call_id, 9_000 + n, "USER_END_CALL", 5)))
    for shard in range(store.settings.shards):
        drainer.drain(shard)


def _party(number: str) -> dict[str, Any]:
    return {"number": number, "alias": number, "is_online": False, "type": "external"}


def _no_wake(shard: int) -> None:
    """The drains here run to the end in this process: nothing to wake."""


def reads(store: Store) -> dict[str, Callable[[], object]]:
    docs, now_ms = store.docs, 10**13
    return {
        "active_first_page": lambda: docs.active_calls(None, None, 0, 50),
        "active_page_at_1000": lambda: docs.active_calls(None, None, 1000, 50),
        "active_by_number": lambda: docs.active_calls(SHARED_NUMBER, None, 0, 50),
        "sweeper_1000_silent": lambda: docs.stale_call_ids(now_ms, 1000),
        "latest_50_records": lambda: recordstream.newest(store.redis, store.keys, 50),
    }


def timed_ms(read: Callable[[], object], times: int) -> list[float]:
    found = []
    for _ in range(times):
        started = time.perf_counter()
        read()
        found.append((time.perf_counter() - started) * 1000)
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="callstate-fanout-"))
    servers, stores = {}, {}
    try:
        for shards in args.shards:
            server = RedisServer(workdir / f"redis-{shards}", fsync="everysec")
            server.start()
            servers[shards] = server
            settings = Settings(
                redis_url=server.url, embedded_redis=False, var_dir=workdir, shards=shards
            )
            stores[shards] = Store(server.client(), settings)
            fill(stores[shards], args.calls, args.ended)
        samples: dict[int, dict[str, list[float]]] = {s: {} for s in args.shards}
        for n in range(args.rounds):
            order = args.shards if n % 2 == 0 else args.shards[::-1]
            for shards in order:
                for name, read in reads(stores[shards]).items():
                    samples[shards].setdefault(name, []).extend(timed_ms(read, args.reads))
    finally:
        for server in servers.values():
            server.stop()
    return {
        "machine": machine(),
        "args": vars(args),
        "median_ms": {
            str(shards): {name: round(statistics.median(ms), 3) for name, ms in found.items()}
            for shards, found in samples.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    figures = run(parse_args(argv))
    names = list(next(iter(figures["median_ms"].values())))
    print("shards  " + "  ".join(f"{name:>20}" for name in names))
    for shards, found in figures["median_ms"].items():
        print(f"{shards:>6}  " + "  ".join(f"{found[name]:>20.3f}" for name in names))
    print(write_figures("fanout", figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
