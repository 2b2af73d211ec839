"""The load generator, run apart from the stack: `python -m bench.load --url ... --out result.json`.

Each thread owns a set of interleaved calls and sends each call's deliveries in order (the next
one after the previous was answered), at a fixed offered rate or as fast as answers come. Some
answers are followed by probes that poll `GET /calls/<id>` until the event is applied.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import random
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench.traffic import PlannedCall, plan_call

HEADERS = {"Content-Type": "application/json"}
PROBE_TIMEOUT_S = 30.0
PROBE_INTERVAL_S = 0.01


RETRY_PAUSE_S = 0.05
RETRY_GIVE_UP_S = 120.0


@dataclass
class Tally:
    """What one thread saw; merged at the end."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Refusal windows: from a refused delivery to the next accepted one, in seconds.
    outages_s: list[float] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)
    slowest_ms: float = 0.0


class Client:
    """One keep-alive HTTP connection, reopened after an error."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        try:
            self.conn.request(method, path, body=body, headers=HEADERS if body else {})
            response = self.conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            return 0, b""


def percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def pick(share: float) -> float:
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    return {"count": len(ordered), "p50": pick(0.5), "p99": pick(0.99), "max": ordered[-1]}


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = 0.0
        self.probes: queue.Queue[tuple[str, int, float] | None] = queue.Queue()
        self.lags_ms: list[float] = []
        self.gets_ms: list[float] = []
        self.lock = threading.Lock()

    def run(self) -> dict[str, Any]:
        args = self.args
        tallies = [Tally() for _ in range(args.threads)]
        senders = [
            threading.Thread(target=self.send, args=(n, tallies[n])) for n in range(args.threads)
        ]
        probers = [threading.Thread(target=self.probe) for _ in range(args.probers)]
        for thread in probers:
            thread.start()
        started = time.monotonic()
        self.deadline = started + args.duration
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
        elapsed = time.monotonic() - started
        for _ in probers:
            self.probes.put(None)
        for thread in probers:
            thread.join()
        calls: dict[str, dict[str, Any]] = {}
        for tally in tallies:
            calls.update(tally.calls)
        return {
            "outages": [s for tally in tallies for s in tally.outages_s],
            "slowest_ms": max(tally.slowest_ms for tally in tallies),
            "latencies": [ms for tally in tallies for ms in tally.latencies_ms],
            "lags": self.lags_ms,
            "gets": self.gets_ms,
            "errors": sum(tally.errors for tally in tallies),
            "seconds": elapsed,
            "calls": calls,
        }

    def send(self, thread: int, tally: Tally) -> None:
        args = self.args
        rng = random.Random(args.seed * 1000 + thread)
        client = Client(args.url)
        interval = args.threads / args.rate if args.rate else 0.0
        next_at = time.monotonic() + rng.random() * interval
        pool: list[tuple[PlannedCall, int]] = []
        started_calls = 0
        # Calls of the last hour, as the provider stamps them: records far older than their
        # retention would be trimmed (under each shard's drain lock) at every maintenance run.
        first_ms = int(time.time() * 1000) - 3_600_000
        while True:
            if time.monotonic() < self.deadline:
                while len(pool) < args.calls_per_thread:
                    call_id = f"{args.prefix}-{thread}-{started_calls}"
                    pool.append((plan_call(call_id, rng, first_ms + started_calls * 100), 0))
                    started_calls += 1
            if not pool:
                return
            slot = rng.randrange(len(pool))
            planned, step = pool[slot]
            if interval:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
            self.deliver(client, tally, planned, step, rng)
            if step + 1 == len(planned.sends):
                pool.pop(slot)
            else:
                pool[slot] = (planned, step + 1)

    def deliver(
        self, client: Client, tally: Tally, planned: PlannedCall, step: int, rng: random.Random
    ) -> None:
        body = json.dumps(planned.sends[step]).encode()
        refused_since: float | None = None
        while True:
            sent_at = time.monotonic()
            status, reply = client.request("POST", "/webhooks/stringee", body)
            answered_at = time.monotonic()
            tally.slowest_ms = max(tally.slowest_ms, (answered_at - sent_at) * 1000)
            if status == 200:
                break
            tally.errors += 1
            tally.refusals[planned.call_id] = tally.refusals.get(planned.call_id, 0) + 1
            # As the provider does: deliver again until it is taken, or give up.
            if not self.args.retry:
                return
            refused_since = refused_since or sent_at
            if answered_at - refused_since > RETRY_GIVE_UP_S:
                return
            time.sleep(RETRY_PAUSE_S)
        if refused_since is not None:
            tally.outages_s.append(answered_at - refused_since)
        tally.latencies_ms.append((answered_at - sent_at) * 1000)
        refusals = tally.refusals.pop(planned.call_id, 0)
        if self.args.echo:
            return
        record = tally.calls.setdefault(
            planned.call_id,
            {
                "expected": planned.expected,
                "acked": [],
                "statuses": [],
                "refused": 0,
                "sends": len(planned.sends),
            },
        )
        # A refused delivery may still have been logged (its answer was lost): the checks
        # allow that many extra copies of the call's events, as duplicates.
        record["refused"] += refusals
        record["acked"].append(json.loads(reply)["log_id"])
        record["statuses"].append(planned.sends[step]["call_status"])
        if rng.random() < self.args.probe_share:
            self.probes.put((planned.call_id, step + 1, answered_at))

    def probe(self) -> None:
        client = Client(self.args.url)
        while (item := self.probes.get()) is not None:
            call_id, version, answered_at = item
            give_up = answered_at + PROBE_TIMEOUT_S
            while time.monotonic() < give_up:
                sent_at = time.monotonic()
                status, reply = client.request("GET", f"/calls/{call_id}")
                now = time.monotonic()
                with self.lock:
                    self.gets_ms.append((now - sent_at) * 1000)
                if status == 200 and json.loads(reply)["version"] >= version:
                    with self.lock:
                        self.lags_ms.append((now - answered_at) * 1000)
                    break
                time.sleep(PROBE_INTERVAL_S)


def command(
    url: str, out: Path, duration: float, rate: float, prefix: str, threads: int, *flags: str
) -> list[str]:
    """The command line that runs this load generator as a process of its own."""
    options = {
        "--url": url,
        "--out": str(out),
        "--duration": str(duration),
        "--rate": str(rate),
        "--prefix": prefix,
        "--threads": str(threads),
    }
    return [sys.executable, "-m", "bench.load", *(x for o in options.items() for x in o), *flags]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0, help="offered events/s; 0 = max")
    parser.add_argument("--threads", type=int, default=16, help="in all processes together")
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="one Python process's threads contend for its GIL: spread them",
    )
    parser.add_argument("--calls-per-thread", type=int, default=8)
    parser.add_argument("--probers", type=int, default=8)
    parser.add_argument("--probe-share", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prefix", default="bench")
    parser.add_argument("--echo", action="store_true", help="the target is the bare echo floor")
    parser.add_argument(
        "--retry", action="store_true", help="deliver a refused event again until it is taken"
    )
    args = parser.parse_args()
    with ProcessPoolExecutor(args.processes) as pool:
        parts = list(pool.map(run_part, [args] * args.processes, range(args.processes)))
    with open(args.out, "w") as out:
        json.dump(merge(parts), out)


def run_part(args: argparse.Namespace, index: int) -> dict[str, Any]:
    """One process's share of the load: its threads, its calls and its slice of the rate."""
    share = args.processes
    part = argparse.Namespace(**vars(args))
    part.prefix, part.seed = f"{args.prefix}{index}", args.seed * 100 + index
    part.threads = max(1, args.threads // share)
    part.probers = max(1, args.probers // share)
    part.rate = args.rate / share
    return Load(part).run()


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [ms for part in parts for ms in part["latencies"]]
    seconds = max(part["seconds"] for part in parts)
    calls: dict[str, Any] = {}
    for part in parts:
        calls.update(part["calls"])
    return {
        "sent": len(latencies),
        "errors": sum(part["errors"] for part in parts),
        "longest_refusal_s": max((s for part in parts for s in part["outages"]), default=0.0),
        "slowest_answer_ms": max(part["slowest_ms"] for part in parts),
        "seconds": seconds,
        "throughput": len(latencies) / seconds,
        "latency_ms": percentiles(latencies),
        "apply_lag_ms": percentiles([ms for part in parts for ms in part["lags"]]),
        "get_ms": percentiles([ms for part in parts for ms in part["gets"]]),
        "calls": calls,
    }


if __name__ == "__main__":
    main()
