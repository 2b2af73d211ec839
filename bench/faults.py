"""The fault suite and the soak: `make faults` (`python -m bench.faults --help`).

Real processes (gunicorn, RQ workers, the scheduler, Redis with its append-only file) take whole
calls at half the measured maximum rate, delivered again until acknowledged, as the provider
does. During the load, one fault after another; after each, every acknowledged event must be
applied exactly once, every call must match the traffic's reference model, nothing may be
quarantined, and `callstate rebuild --check` must find nothing to change. The soak then runs the
same load with no fault and reports the exact apply lag and RQ's queue minute by minute.

With `--sentinel` the stack runs on a primary, two replicas and three sentinels, with
CALLSTATE_REPLICA_ACKS=1 (with 2, the one replica left after a failover could never confirm:
every event would get a 503 until a replica is added; README), and the fault
`primary_failover` kills the primary for good: Sentinel promotes a replica.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from bench.load import command, percentiles
from bench.results_file import write_figures
from bench.traffic import PlannedCall, check_call
from callstate import recordstream, streamids
from callstate.calldoc import CallDoc
from callstate.config import Settings
from callstate.connection import connect_queue
from callstate.figures import read_figures
from callstate.jobs import DRAIN_JOB
from callstate.store import Store
from tests.integration.ha import SentinelSet
from tests.integration.stack import RedisServer, Stack, wait_until

FAULTS = ("worker_kills", "web_kill", "redis_kill", "redis_hang", "redis_full")
SENTINEL_FAULTS = ("primary_failover",)
WORKERS = ("worker-0", "worker-1")
ENV = {
    "CALLSTATE_SHARDS": "4",
    # A killed drainer's shard is taken over after its lock's TTL; maintenance wakes it.
    "CALLSTATE_DRAIN_LOCK_SECONDS": "5",
    "CALLSTATE_MAINTENANCE_INTERVAL_SECONDS": "1",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phase-seconds", type=float, default=60.0, help="load per fault")
    parser.add_argument("--hang-seconds", type=float, default=10.0, help="Redis SIGSTOPped")
    parser.add_argument("--full-seconds", type=float, default=5.0, help="Redis at maxmemory")
    parser.add_argument("--soak-seconds", type=float, default=600.0, help="0: no soak")
    parser.add_argument("--calibration-seconds", type=float, default=10.0)
    parser.add_argument("--faults", default=None, help="comma-separated subset")
    parser.add_argument(
        "--sentinel", action="store_true", help="on Sentinel: the fault primary_failover"
    )
    parser.add_argument("--threads", type=int, default=16, help="load-generator threads")
    parser.add_argument("--quick", action="store_true", help="a few seconds per fault (CI)")
    parser.add_argument("--out", type=Path, default=None, help="result file (JSON)")
    args = parser.parse_args(argv)
    args.faults = args.faults or ",".join(SENTINEL_FAULTS if args.sentinel else FAULTS)
    if args.quick:
        args.phase_seconds, args.hang_seconds, args.full_seconds = 5.0, 3.0, 2.0
        args.soak_seconds, args.calibration_seconds, args.threads = 6.0, 3.0, 4
    return args


class Supervisor:
    """Starts again any process of the stack that dies, as a process manager would."""

    def __init__(self, stack: Stack, names: tuple[str, ...]) -> None:
        self.stack = stack
        self.names = names
        self.restarts = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self) -> None:
        while not self.stopped.wait(0.1):
            for name in self.names:
                if self.stack.processes[name].poll() is not None:
                    self.stack.respawn(name)
                    self.restarts += 1


@dataclass
class Phase:
    """One fault under load: when it ended, and what the load generator saw."""

    name: str
    fault_ended: float = 0.0
    recovered_after: float = 0.0


class Faults:
    def __init__(self, args: argparse.Namespace, stack: Stack, redis_server: RedisServer) -> None:
        self.args = args
        self.stack = stack
        self.redis_server = redis_server
        self.redis: Redis = stack.redis.client()
        self.settings = Settings.from_env(stack.env)
        self.store = Store(self.redis, self.settings, connect_queue(self.settings, self.redis))
        self.queue = Queue(self.settings.queue_name, connection=self.store.queue_redis)
        self.rng = random.Random(5)

    # Load -------------------------------------------------------------------------------------

    def start_load(
        self, name: str, seconds: float, rate: float
    ) -> tuple[subprocess.Popen[bytes], Path]:
        out = self.stack.workdir / f"load-{name}.json"
        # No probes: lag is measured exactly, from stream ids. Calibration does not retry.
        flags = ["--probers", "1", "--probe-share", "0", *(["--retry"] if rate else [])]
        argv = command(self.stack.web_url, out, seconds, rate, name, self.args.threads, *flags)
        load = subprocess.Popen(argv, cwd=Path(__file__).parents[1], env=self.stack.env)
        return load, out

    def finish_load(self, load: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
        load.wait(timeout=self.args.phase_seconds + 300)
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def max_rate(self) -> float:
        load, out = self.start_load("calibration", self.args.calibration_seconds, 0.0)
        result = self.finish_load(load, out)
        self.wait_drained()
        return float(result["throughput"])

    # Faults -----------------------------------------------------------------------------------

    def inject(self, name: str, seconds: float) -> None:
        """Apply one fault; return once it is over (the process is back, Redis answers)."""
        if name == "worker_kills":
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                self.stack.kill(self.stack.processes[self.rng.choice(WORKERS)])
                time.sleep(self.rng.uniform(1.0, 3.0))
        elif name == "web_kill":
            children = _children(self.stack.processes["web"].pid)
            os.kill(self.rng.choice(children), signal.SIGKILL)
        elif name == "redis_kill":
            self.redis_server.kill()
            time.sleep(1.0)
            self.redis_server.start()
        elif name == "primary_failover":
            self.redis_server.kill()
        elif name == "redis_hang":
            process = self.redis_server.process
            assert process is not None
            os.kill(process.pid, signal.SIGSTOP)
            time.sleep(self.args.hang_seconds)
            os.kill(process.pid, signal.SIGCONT)
        elif name == "redis_full":
            used = int(self.redis.info("memory")["used_memory"])
            self.redis.config_set("maxmemory", used + 64 * 1024)
            time.sleep(self.args.full_seconds)
            self.redis.config_set("maxmemory", 0)

    def run_fault(self, name: str, rate: float) -> dict[str, Any]:
        quarantined_before = self.quarantined()
        phase = Phase(name)
        load, out = self.start_load(name, self.args.phase_seconds, rate)
        time.sleep(self.args.phase_seconds * 0.3)
        self.inject(name, self.args.phase_seconds * 0.5)
        phase.fault_ended = time.monotonic()
        logged_by_then = self.retrying(self.last_log_ids)
        self.retrying(
            lambda: wait_until(lambda: self.applied_up_to(logged_by_then), 300, "recovery")
        )
        phase.recovered_after = time.monotonic() - phase.fault_ended
        result = self.finish_load(load, out)
        self.wait_drained()
        check = self.check(result["calls"])
        rebuild = self.stack.cli("rebuild", "--check")
        return {
            "fault": name,
            **check,
            "longest_refusal_s": result["longest_refusal_s"],
            "slowest_answer_ms": result["slowest_answer_ms"],
            "refused_deliveries": result["errors"],
            "recovered_after_s": phase.recovered_after,
            "quarantined": self.quarantined() - quarantined_before,
            "rebuild_check_clean": rebuild.returncode == 0,
        }

    # Soak -------------------------------------------------------------------------------------

    def soak(self, rate: float) -> dict[str, Any]:
        queued: list[tuple[float, int, int]] = []
        started = time.monotonic()
        load, out = self.start_load("soak", self.args.soak_seconds, rate)
        while load.poll() is None:
            shards = Counter(j.args[0] for j in self.queue.get_jobs() if j.func_name == DRAIN_JOB)
            queued.append(
                (time.monotonic() - started, self.queue.count, max(shards.values(), default=0))
            )
            time.sleep(1.0)
        result = self.finish_load(load, out)
        self.wait_drained()
        lags = self.exact_lags(result["calls"])
        minutes = []
        for minute in range(int(self.args.soak_seconds // 60) or 1):
            window = [lag for at, lag in lags if minute * 60 <= at - lags[0][0] < (minute + 1) * 60]
            in_queue = [q for at, q, _ in queued if minute * 60 <= at < (minute + 1) * 60]
            drains = [d for at, _, d in queued if minute * 60 <= at < (minute + 1) * 60]
            minutes.append(
                {
                    "minute": minute + 1,
                    "lag_ms": percentiles(window),
                    "queue_max": max(in_queue, default=0),
                    "drain_jobs_per_shard_max": max(drains, default=0),
                }
            )
        return {
            "rate": rate,
            "seconds": self.args.soak_seconds,
            "acknowledged": result["sent"],
            "lag_ms": percentiles([lag for _, lag in lags]),
            "minutes": minutes,
            **self.check(result["calls"]),
        }

    def exact_lags(self, calls: dict[str, Any]) -> list[tuple[float, float]]:
        """Per call: from its first `ended` append to its first record's commit, both stream ids,
        so both on Redis's clock: (logged at, lag), in ms."""
        first_record: dict[str, int] = {}
        for row in recordstream.every(self.redis, self.store.keys):
            first_record.setdefault(row.fields[b"call_id"].decode(), streamids.millis(row.entry_id))
        lags = []
        for call_id, info in calls.items():
            ended = [
                log_id
                for log_id, status in zip(info["acked"], info["statuses"], strict=True)
                if status == "ended"
            ]
            if ended and call_id in first_record:
                logged = streamids.millis(ended[0])
                lags.append((logged / 1000, float(first_record[call_id] - logged)))
        return sorted(lags)

    # Checks -----------------------------------------------------------------------------------

    def check(self, calls: dict[str, Any]) -> dict[str, Any]:
        """Acknowledged ids against journals, and every call against its reference model. Events
        delivered again after a lost answer may add `duplicate` verdicts, nothing else."""
        acked = lost = doubled = differing = 0
        examples: list[str] = []
        ids = sorted(calls)
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            docs = self.store.docs.load_docs(chunk)
            for call_id in chunk:
                info, doc = calls[call_id], docs[call_id]
                journal = [item["log_id"] for item in (doc or {"journal": []})["journal"]]
                acked += len(info["acked"])
                lost += len(set(info["acked"]) - set(journal))
                doubled += len(journal) - len(set(journal))
                problems = _model_problems(call_id, info, doc)
                differing += bool(problems)
                examples += problems[:1]
        records: dict[str, int] = {}
        for row in recordstream.every(self.redis, self.store.keys):
            name = row.fields[b"call_id"].decode()
            records[name] = records.get(name, 0) + 1
        wrong_records = sum(1 for c in ids if records.get(c) != calls[c]["expected"]["revision"])
        return {
            "calls": len(ids),
            "acknowledged": acked,
            "lost": lost,
            "applied_twice": doubled,
            "calls_differing": differing,
            "wrong_record_counts": wrong_records,
            "examples": examples[:5],
        }

    def quarantined(self) -> int:
        """Entries set aside (exact counters) and refused deliveries kept, together."""
        counted = read_figures(self.store).verdicts.get("rejected:unprocessable", 0)
        return counted + int(self.redis.llen(self.store.keys.quarantine()))

    def last_log_ids(self) -> dict[int, str | None]:
        return {shard: self.store.log.last_log_id(shard) for shard in range(self.settings.shards)}

    def applied_up_to(self, ids: dict[int, str | None]) -> bool:
        for shard, last in ids.items():
            cursor = self.store.log.cursor(shard)
            behind = cursor is None or streamids.parse(cursor) < streamids.parse(last or "0-0")
            if last is not None and behind:
                return False
        return True

    def wait_drained(self) -> None:
        self.retrying(
            lambda: wait_until(
                lambda: not any(self.store.log.has_backlog(s) for s in range(self.settings.shards)),
                300,
                "the drain",
            )
        )

    def retrying(self, read: Callable[[], Any]) -> Any:
        """Redis may still be coming back: a read that fails is tried again, for a while."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return read()
            except RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def _model_problems(call_id: str, info: dict[str, Any], doc: CallDoc | None) -> list[str]:
    """What differs from the model. A delivery refused with a lost answer may have been logged
    all the same and delivered again: for each refusal the call saw, one extra journal entry is
    allowed, and it must add exactly one `duplicate` (whichever copy was logged first is the one
    applied); nothing else may differ. Lost and doubled ids are counted apart."""
    journal = (doc or {"journal": []})["journal"]
    acked = set(info["acked"])
    extra = [item for item in journal if item["log_id"] not in acked]
    problems = []
    if len(extra) > info["refused"]:
        problems.append(
            f"{call_id}: {len(extra)} unacknowledged entries, {info['refused']} refused"
        )
    expected = dict(info["expected"])
    planned_duplicates = expected["counts"]["duplicate"]
    expected["counts"] = expected["counts"] | {"duplicate": planned_duplicates + len(extra)}
    if [item["log_id"] for item in journal if item["log_id"] in acked] != info["acked"]:
        problems.append(f"{call_id}: acknowledged ids missing or out of order in the journal")
    # The journal's ids were checked just above, extra copies included: compare the rest.
    logged = [item["log_id"] for item in journal]
    return problems + check_call(PlannedCall(call_id, [], expected), doc, logged)


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(line) for line in found.stdout.split()]


@contextmanager
def running_stack(
    workdir: Path, sentinel: bool = False
) -> Iterator[tuple[Stack, RedisServer, Supervisor]]:
    """The stack and the Redis its faults hit: the one server, or on Sentinel the primary."""
    server: RedisServer | SentinelSet
    if sentinel:
        server = SentinelSet(workdir / "ha")
        primary, env = server.primary, {**ENV, **server.env, "CALLSTATE_REPLICA_ACKS": "1"}
    else:
        server = primary = RedisServer(workdir / "redis")
        env = ENV
    server.start()
    stack = Stack(server, workdir, env)
    stack.start_web(2)
    stack.start_workers(len(WORKERS))
    stack.start_scheduler()
    supervisor = Supervisor(stack, ("web", *WORKERS, "scheduler"))
    supervisor.thread.start()
    try:
        yield stack, primary, supervisor
    finally:
        supervisor.stopped.set()
        supervisor.thread.join()
        stack.stop()
        server.stop()


def table(figures: dict[str, Any]) -> str:
    head = (
        "fault",
        "acked",
        "lost",
        "twice",
        "differ",
        "quarantined",
        "rebuild",
        "longest 503 s",
        "slowest ms",
        "recover s",
    )
    rows = [head]
    for run in figures["faults"]:
        rows.append(
            (
                run["fault"],
                str(run["acknowledged"]),
                str(run["lost"]),
                str(run["applied_twice"]),
                str(run["calls_differing"] + run["wrong_record_counts"]),
                str(run["quarantined"]),
                "clean" if run["rebuild_check_clean"] else "DIFFERS",
                f"{run['longest_refusal_s']:.1f}",
                f"{run['slowest_answer_ms']:.0f}",
                f"{run['recovered_after_s']:.1f}",
            )
        )
    widths = [max(len(row[n]) for row in rows) for n in range(len(head))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    soak = figures.get("soak")
    if soak:
        lines.append("")
        lines.append(
            f"soak: {soak['rate']:.0f} events/s offered for {soak['seconds']:.0f} s, "
            f"{soak['acknowledged']} acknowledged, {soak['lost']} lost, "
            f"{soak['applied_twice']} applied twice, {soak['calls_differing']} differing"
        )
        lines.append("minute  lag p50 ms  lag p99 ms  lag max ms  queue max  per shard max")
        for minute in soak["minutes"]:
            lag = minute["lag_ms"]
            lines.append(
                f"{minute['minute']:>6}  {lag['p50']:>10.1f}  {lag['p99']:>10.1f}  "
                f"{lag['max']:>10.1f}  {minute['queue_max']:>9}  "
                f"{minute['drain_jobs_per_shard_max']:>13}"
            )
    return "\n".join(lines)


def failed(figures: dict[str, Any]) -> bool:
    soak = [figures["soak"]] if figures.get("soak") else []
    bad = ("lost", "applied_twice", "calls_differing", "wrong_record_counts")
    return (
        any(run[name] for run in [*figures["faults"], *soak] for name in bad)
        or any(run["quarantined"] or not run["rebuild_check_clean"] for run in figures["faults"])
        or any(m["drain_jobs_per_shard_max"] > 1 for run in soak for m in run["minutes"])
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="callstate-faults-"))
    figures: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "faults": []}
    with running_stack(workdir, args.sentinel) as (stack, redis_server, supervisor):
        faults = Faults(args, stack, redis_server)
        rate = faults.max_rate() / 2
        figures["rate"] = rate
        for name in args.faults.split(","):
            figures["faults"].append(faults.run_fault(name, rate))
            print(f"{name}: done", flush=True)
        if args.soak_seconds:
            figures["soak"] = faults.soak(rate)
        figures["process_restarts"] = supervisor.restarts
    print(table(figures))
    kind = "faults-sentinel" if args.sentinel else "faults"
    out = write_figures(f"{kind}-quick" if args.quick else kind, figures, args.out)
    print(f"figures written to {out}; logs in {workdir}")
    return 1 if failed(figures) else 0


if __name__ == "__main__":
    sys.exit(main())
