"""One Redis against a Redis Cluster of three primaries for the data: `python -m bench.cluster`
(`make bench-cluster`).

Both set-ups run on this machine's cores with RQ's queues on a server of their own
(CALLSTATE_QUEUE_URL, which a cluster needs), the same shards, gunicorn and RQ workers. For each,
alternated (one cluster cluster one ...) on fresh servers so the machine's drift hits both alike:
the webhook's highest rate, the apply capacity (a logged backlog, then every shard woken), and
the apply lag and webhook latency at a fixed rate. Figures to `bench/results/cluster-*.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.results_file import write_figures
from bench.run import Bench, lag_summary, machine
from tests.integration.ha import ClusterSet
from tests.integration.stack import RedisServer, Stack

MODES = ("one", "cluster")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--web", type=int, default=2, help="gunicorn processes")
    parser.add_argument("--workers", type=int, default=4, help="RQ event workers")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--primaries", type=int, default=3)
    parser.add_argument("--threads", type=int, default=16, help="load-generator threads")
    parser.add_argument("--rounds", type=int, default=2, help="one cluster, then cluster one...")
    parser.add_argument("--max-seconds", type=float, default=15.0)
    parser.add_argument("--backlog", type=int, default=20_000, help="events, for apply capacity")
    parser.add_argument("--rate", type=float, default=300.0, help="the fixed rate, req/s")
    parser.add_argument("--rate-seconds", type=float, default=15.0)
    return parser.parse_args(argv)


@contextlib.contextmanager
def deployment(mode: str, args: argparse.Namespace) -> Iterator[Stack]:
    """Fresh servers for `mode` and a stack on them (no process started); all stopped after."""
    workdir = Path(tempfile.mkdtemp(prefix=f"callstate-cluster-bench-{mode}-"))
    queue = RedisServer(workdir / "queue")
    data: RedisServer | ClusterSet
    if mode == "cluster":
        data = ClusterSet(workdir / "cluster", queue, args.primaries, replicas=0)
        env = data.env
    else:
        data = RedisServer(workdir / "redis")
        queue.start()
        env = {"REDIS_URL": data.url, "CALLSTATE_QUEUE_URL": queue.url}
    data.start()
    stack = Stack(data, workdir, {**env, "CALLSTATE_SHARDS": str(args.shards)})
    try:
        yield stack
    finally:
        stack.stop()
        data.stop()
        queue.stop()


def measure(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with deployment(mode, args) as stack:
        bench = Bench(args, stack, stack.workdir)
        bench.start_workers()
        stack.start_web(args.web)
        top = bench.load(f"{mode}-max", args.max_seconds, probes=False)
        bench.wait_drained()
        capacity = bench.drain_rate(f"{mode}-backlog", args.backlog)
        lags_before = bench.lag_histogram()
        fixed = bench.load(f"{mode}-rate", args.rate_seconds, rate=args.rate, probes=False)
        bench.wait_drained()
        return {
            "mode": mode,
            "webhook_max_req_per_s": top["throughput"],
            "webhook_errors": top["errors"] + fixed["errors"],
            "apply_events_per_s": capacity["events_per_s"],
            "fixed_rate_req_per_s": fixed["throughput"],
            "fixed_rate_webhook_ms": fixed["latency_ms"],
            "fixed_rate_apply_lag_ms": lag_summary(bench.lag_histogram(), lags_before),
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for n in range(args.rounds):
        for mode in MODES if n % 2 == 0 else tuple(reversed(MODES)):
            runs.append(measure(mode, args))
            print(_line(runs[-1]), flush=True)
    return {"machine": machine(), "args": vars(args), "runs": runs, "medians": _medians(runs)}


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    medians: dict[str, Any] = {}
    for mode in MODES:
        mine = [run for run in runs if run["mode"] == mode]
        medians[mode] = {
            "webhook_max_req_per_s": statistics.median(r["webhook_max_req_per_s"] for r in mine),
            "apply_events_per_s": statistics.median(r["apply_events_per_s"] for r in mine),
            "fixed_rate_webhook_p99_ms": statistics.median(
                r["fixed_rate_webhook_ms"]["p99"] for r in mine
            ),
            "fixed_rate_apply_lag_p50_ms": statistics.median(
                r["fixed_rate_apply_lag_ms"]["p50"] for r in mine
            ),
            "fixed_rate_apply_lag_p99_ms": statistics.median(
                r["fixed_rate_apply_lag_ms"]["p99"] for r in mine
            ),
        }
    one, cluster = medians["one"], medians["cluster"]
    medians["ratio_cluster_one"] = {
        name: cluster[name] / one[name] for name in ("webhook_max_req_per_s", "apply_events_per_s")
    }
    return medians


def _line(run: dict[str, Any]) -> str:
    lag = run["fixed_rate_apply_lag_ms"]
    return (
        f"{run['mode']:<7} webhook max {run['webhook_max_req_per_s']:6.0f} req/s"
        f" | apply {run['apply_events_per_s']:6.0f} events/s"
        f" | at {run['fixed_rate_req_per_s']:.0f} req/s: webhook p99"
        f" {run['fixed_rate_webhook_ms']['p99']:.1f} ms, apply lag p50 {lag['p50']:g}"
        f" / p99 {lag['p99']:g} ms | errors {run['webhook_errors']}"
    )


def main(argv: list[str] | None = None) -> int:
    figures = run(parse_args(argv))
    ratios = figures["medians"]["ratio_cluster_one"]
    print(
        f"cluster / one Redis, medians: webhook {ratios['webhook_max_req_per_s']:.3f},"
        f" apply {ratios['apply_events_per_s']:.3f}"
    )
    print(f"figures written to {write_figures('cluster', figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
