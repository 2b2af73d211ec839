"""What record forwarding costs the drainers: apply capacity on a backlog with forwarding on (the
records worker sending every revision to a local receiver that answers 200) and off, alternated.

`python -m bench.forwarding` runs this phase alone (its own Redis, the bench's defaults); `make
bench` runs it after the other phases. The receiver (`tests/receiver.py`) stands for another
machine: it runs at the lowest CPU priority, so that its own work weighs as little as possible on
the 2 cores the service shares with it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rq import Worker

from bench.metrics_cost import alternating, compare
from bench.results_file import write_figures
from tests.integration.stack import Stack, free_port, wait_until

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # noqa: S105 - a test key for its own receiver
RECEIVER_NICE = 19
TARGET_RATIO = 0.90  # forwarding may lower apply capacity by at most 10%


class ForwardingCost:
    """Alternated runs of the bench's apply-capacity measure with forwarding on and off."""

    def __init__(self, bench: Any) -> None:
        self.bench = bench
        self.workdir: Path = bench.workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/records"

    def run(self, events_per_s: float, rounds: int, drain_seconds: float) -> dict[str, Any]:
        bench = self.bench
        bench.stop_workers()
        bench.redis.flushdb()
        events = max(bench.args.calibration_events, int(events_per_s * drain_seconds))
        receiver = Stack(bench.stack.redis, self.workdir, {})
        argv = [sys.executable, "-m", "tests.receiver", "--nice", str(RECEIVER_NICE)]
        receiver.spawn("receiver", [*argv, "--port", str(self.port)])
        runs, forwarded = [], []
        try:
            for n, mode in enumerate(alternating(rounds)):
                stack = self.workers(mode)
                try:
                    applied = bench.drain_rate(f"forwarding-{n}", events)
                    runs.append((mode, applied["events_per_s"]))
                    if mode == "on":
                        forwarded.append(self.wait_forwarded(applied["seconds"]))
                finally:
                    stack.stop()
        finally:
            receiver.stop()
        bench.start_workers()
        result = compare(runs)
        result["events_per_run"] = events
        result["forwarded"] = forwarded
        result["target_ratio"] = TARGET_RATIO
        return result

    def workers(self, mode: str) -> Stack:
        """The bench's W event workers, and with forwarding on the records worker too."""
        bench = self.bench
        env = {"CALLSTATE_SHARDS": str(bench.settings.shards)}
        if mode == "on":
            env |= {
                "CALLSTATE_RECORD_WEBHOOK_URL": self.url,
                "CALLSTATE_RECORD_WEBHOOK_SECRET": SECRET,
            }
        stack = Stack(bench.stack.redis, self.workdir, env)
        stack.start_workers(bench.args.workers, prefix=f"worker-fwd-{mode}")
        if mode == "on":
            stack.spawn("records", [sys.executable, "-m", "workers.records"])
            stack.spawn("retries", [sys.executable, "-m", "workers.records", "--retries"])
        wanted = bench.args.workers
        wait_until(lambda: len(Worker.all(queue=bench.queue)) == wanted, 30, "the workers")
        return stack

    def wait_forwarded(self, apply_seconds: float) -> dict[str, Any]:
        """Wait until the outboxes are empty and nothing is retrying; the forwarder's pace."""
        bench, keys = self.bench, self.bench.store.keys

        def left() -> int:
            outboxes = sum(bench.redis.xlen(keys.outbox(s)) for s in range(keys.shards))
            pending = sum(
                bench.store.queue_redis.hlen(keys.forward_pending(s)) for s in range(keys.shards)
            )
            return int(outboxes + pending)

        started = time.monotonic()
        wait_until(lambda: left() == 0, 600, "the outboxes to empty")
        figures = bench.store.queue_redis.hgetall
        delivered = sum(
            int(figures(keys.forward_counters(shard)).get(b"delivered", 0))
            for shard in range(bench.settings.shards)
        )
        return {
            "delivered_so_far": delivered,
            "seconds_after_apply": time.monotonic() - started,
            "apply_seconds": apply_seconds,
        }


def summary(result: dict[str, Any]) -> str:
    on, off = result["on"], result["off"]
    return (
        f"apply capacity with forwarding on / off: {on['median']:.0f} / {off['median']:.0f} "
        f"events/s (medians of {len(on['runs'])} runs each, alternated): ratio "
        f"{result['ratio']:.3f} (target >= {TARGET_RATIO})"
    )


def main(argv: list[str] | None = None) -> int:
    from bench.run import bench_on_redis, machine, parse_args  # bench.run imports this module

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (on, off, off, on)")
    parser.add_argument("--drain-seconds", type=float, default=6.0, help="size of each backlog")
    parser.add_argument("--workers", type=int, default=2)
    own = parser.parse_args(argv)
    args = parse_args(["--workers", str(own.workers)])
    with bench_on_redis(args, "callstate-bench-forwarding-") as bench:
        bench.start_workers()
        calibration = bench.drain_rate("calibration", args.calibration_events)
        result = ForwardingCost(bench).run(
            calibration["events_per_s"], own.rounds, own.drain_seconds
        )
    figures = {"machine": machine(), "args": vars(own), "forwarding_cost": result}
    print(summary(result))
    out = write_figures("forwarding", figures)
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
