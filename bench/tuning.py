"""How the drain settings trade apply lag against throughput: `python -m bench.tuning`.

Each variant (e.g. `workers=2`, `window=2`, `fsync=everysec`; keys: workers, slice, linger,
window, fsync) gets a stack of its own, the webhook's highest sustained rate for --max-seconds,
then half of it for --half-seconds, with the exact apply lag of every event and each role's CPU
per event (as in `make bench`). Variants run in the order given, then in reverse (A B B A), so
the machine's drift hits them alike. Figures to `bench/results/tuning-*.json`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bench.results_file import write_figures
from bench.run import bench_on_redis, machine
from callstate.config import Settings

DEFAULT_VARIANTS = ["workers=4", "workers=2", "window=2", "linger=20,slice=50"]
SETTINGS = {
    "slice": "CALLSTATE_DRAIN_SLICE_MS",
    "linger": "CALLSTATE_DRAIN_LINGER_MS",
    "window": "CALLSTATE_DRAIN_WINDOW_MS",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variants", nargs="*", default=DEFAULT_VARIANTS)
    parser.add_argument("--web", type=int, default=2)
    parser.add_argument("--shards", type=int, default=Settings.shards)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--half-seconds", type=float, default=20.0)
    return parser.parse_args(argv)


def variant_args(
    base: argparse.Namespace, variant: str
) -> tuple[argparse.Namespace, dict[str, str]]:
    """The bench's arguments and the environment of one variant."""
    args = argparse.Namespace(**vars(base), workers=4, fsync=Settings.fsync)
    env: dict[str, str] = {}
    for item in filter(None, variant.split(",")):
        name, _, value = item.partition("=")
        if name in SETTINGS:
            env[SETTINGS[name]] = value
        elif name in ("workers", "fsync"):
            setattr(args, name, int(value) if name == "workers" else value)
        else:
            raise SystemExit(f"unknown setting {name!r} in variant {variant!r}")
    return args, env


def run_variant(base: argparse.Namespace, variant: str) -> dict[str, Any]:
    args, env = variant_args(base, variant)
    args.duration, args.half_duration = args.max_seconds, args.half_seconds
    with bench_on_redis(args, "callstate-tuning-", env) as bench:
        bench.start_workers()
        bench.stack.start_web(args.web)
        bench.stack.start_scheduler()
        top, _ = bench.max_rate()
        half, _ = bench.half_rate(top["throughput"])
    return {"variant": variant, "max_rate": top, "half_rate": half}


def line(run: dict[str, Any]) -> str:
    top, half = run["max_rate"], run["half_rate"]
    lag, cpu = half["exact_apply_lag_ms"], half["cpu_ms_per_event"]
    return (
        f"{run['variant']:<22} max {top['throughput']:6.0f} req/s | half: lag p50 {lag['p50']:g}"
        f" / p99 {lag['p99']:g} / max {lag['max']:g} ms, CPU ms/event web {cpu['web']:.2f}"
        f" workers {cpu['workers']:.2f} redis {cpu['redis']:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = []
    for variant in [*args.variants, *reversed(args.variants)]:
        runs.append(run_variant(args, variant))
        print(line(runs[-1]), flush=True)
    figures = {"machine": machine(), "runs": runs}
    print(f"figures written to {write_figures('tuning', figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
