"""The apply lag over a long run at half load: `python -m bench.sustained [--minutes 10]`.

Starts the stack as `make bench` does, finds the webhook's highest sustained rate in a short
run, then offers half of it for `--minutes`, reading every shard's apply-lag histogram each
`--window` seconds: each window's exact lag (every event applied in it, on Redis' clock) and RQ's
queue, so a drift shows as it grows. Figures to `bench/results/sustained-*.json`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.load import command
from bench.results_file import write_figures
from bench.run import bench_on_redis, lag_summary, machine
from callstate.config import FSYNC_POLICIES, Settings

REPO = Path(__file__).parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--web", type=int, default=2, help="gunicorn processes")
    parser.add_argument("--workers", type=int, default=4, help="RQ worker processes")
    parser.add_argument("--shards", type=int, default=Settings.shards)
    parser.add_argument("--fsync", choices=FSYNC_POLICIES, default=Settings.fsync)
    parser.add_argument("--threads", type=int, default=16, help="load-generator threads")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the half-load run")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per lag figure")
    parser.add_argument("--max-seconds", type=float, default=15.0, help="the max-rate run")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"machine": machine(), "args": {"minutes": args.minutes}}
    with bench_on_redis(args, "callstate-sustained-") as bench:
        bench.start_workers()
        bench.stack.start_web(args.web)
        bench.stack.start_scheduler()
        top = bench.load("max", args.max_seconds, probes=False)
        bench.wait_drained()
        rate = top["throughput"] / 2
        figures["max_rate"] = top["throughput"]
        figures["offered_rate"] = rate
        out = bench.workdir / "load-sustained.json"
        argv = command(bench.stack.web_url, out, args.minutes * 60, rate, "sustained", args.threads)
        load = subprocess.Popen([*argv, "--probe-share", "0"], cwd=REPO, env=bench.stack.env)
        windows, before, started = [], bench.lag_histogram(), time.monotonic()
        ends = started + args.minutes * 60
        while load.poll() is None:
            if time.monotonic() >= ends:
                load.wait()  # its last events, then the last window
            else:
                time.sleep(min(args.window, ends - time.monotonic()))
            now = bench.lag_histogram()
            window = lag_summary(now, before)
            window |= {"at_s": round(time.monotonic() - started), "queued_jobs": bench.queue.count}
            windows.append(window)
            before = now
            print(window, flush=True)
        bench.wait_drained()
        figures["windows"] = windows
    return figures


def main(argv: list[str] | None = None) -> int:
    figures = run(parse_args(argv))
    print(f"figures written to {write_figures('sustained', figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
