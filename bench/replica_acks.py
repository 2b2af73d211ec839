"""What CALLSTATE_REPLICA_ACKS=1 costs the webhook: `python -m bench.replica_acks`.

A primary and one replica (both the embedded `redis-server`, append-only with fsync always, on
loopback: a replica on another machine adds the network's round trip to every acknowledgement),
the RQ workers applying. For each mode, alternated (on off off on ...) so the machine's drift
hits both alike, gunicorn is started with or without replica acknowledgements and loaded at its
highest rate, then at a fixed rate for the webhook's latency. Figures to
`bench/results/replica-acks-*.json`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.metrics_cost import alternating
from bench.results_file import write_figures
from bench.run import Bench, machine
from tests.integration.stack import RedisServer, Stack

MODES = {"on": "1", "off": "0"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--web", type=int, default=2, help="gunicorn processes")
    parser.add_argument("--workers", type=int, default=4, help="RQ event workers")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--threads", type=int, default=16, help="load-generator threads")
    parser.add_argument("--rounds", type=int, default=2, help="on off, then off on, and so on")
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=300.0, help="the fixed rate, req/s")
    parser.add_argument("--rate-seconds", type=float, default=10.0)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="callstate-replica-acks-"))
    primary = RedisServer(workdir / "primary")
    primary.start()
    replica = RedisServer(workdir / "replica", replica_of=primary)
    runs: list[dict[str, Any]] = []
    stack = Stack(primary, workdir, {"CALLSTATE_SHARDS": str(args.shards)})
    try:
        replica.start()
        bench = Bench(args, stack, workdir)
        bench.start_workers()
        for n, mode in enumerate(alternating(args.rounds)):
            stack.env["CALLSTATE_REPLICA_ACKS"] = MODES[mode]
            stack.start_web(args.web, name=f"web-{n}")
            top = bench.load(f"max-{n}", args.max_seconds, probes=False)
            fixed = bench.load(f"rate-{n}", args.rate_seconds, rate=args.rate, probes=False)
            stack.stop_process(f"web-{n}")
            runs.append({"mode": mode, "max": _brief(top), "fixed_rate": _brief(fixed)})
            print(_line(runs[-1]), flush=True)
        bench.wait_drained()
    finally:
        stack.stop()
        replica.stop()
        primary.stop()
    return {"machine": machine(), "args": vars(args), "runs": runs, "medians": _medians(runs)}


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "throughput": result["throughput"],
        "latency_ms": result["latency_ms"],
        "errors": result["errors"],
    }


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    medians: dict[str, Any] = {}
    for mode in MODES:
        mine = [run for run in runs if run["mode"] == mode]
        medians[mode] = {
            "max_req_per_s": statistics.median(run["max"]["throughput"] for run in mine),
            "fixed_rate_p50_ms": statistics.median(
                run["fixed_rate"]["latency_ms"]["p50"] for run in mine
            ),
            "fixed_rate_p99_ms": statistics.median(
                run["fixed_rate"]["latency_ms"]["p99"] for run in mine
            ),
        }
    medians["max_ratio_on_off"] = medians["on"]["max_req_per_s"] / medians["off"]["max_req_per_s"]
    return medians


def _line(run: dict[str, Any]) -> str:
    top, fixed = run["max"], run["fixed_rate"]
    return (
        f"replica acks {run['mode']:<3} max {top['throughput']:6.0f} req/s"
        f" | at {fixed['throughput']:.0f} req/s: webhook p50 {fixed['latency_ms']['p50']:.1f}"
        f" / p99 {fixed['latency_ms']['p99']:.1f} ms | errors {top['errors'] + fixed['errors']}"
    )


def main(argv: list[str] | None = None) -> int:
    figures = run(parse_args(argv))
    medians = figures["medians"]
    print(
        f"medians: on {medians['on']['max_req_per_s']:.0f} req/s, off"
        f" {medians['off']['max_req_per_s']:.0f} req/s, ratio {medians['max_ratio_on_off']:.3f};"
        f" p99 at the fixed rate on {medians['on']['fixed_rate_p99_ms']:.1f} ms,"
        f" off {medians['off']['fixed_rate_p99_ms']:.1f} ms"
    )
    print(f"figures written to {write_figures('replica-acks', figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
