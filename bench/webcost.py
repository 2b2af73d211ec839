"""The web's CPU per webhook request, two variants alternated (A B B A) with the bare echo in the
same run: `python -m bench.webcost [--b-tree DIR] [--a-env K=V] [--b-env K=V] ...`.

A variant is a source tree (its `callstate` and `gunicorn.conf.py`; a `git worktree` of another
commit, say) and environment variables. Each runs as `Stack.start_web(2)` runs gunicorn, by
default with no RQ worker (the web alone: events accumulate in the log; `--workers 2` applies
them beside it, as in production), loaded at the maximum rate; its CPU is the sum of utime and
stime over gunicorn's process group, read from /proc before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.load import command
from callstate.config import Settings
from tests.integration.stack import BIN, REPO, RedisServer, Stack

TICK = os.sysconf("SC_CLK_TCK")


class TreeStack(Stack):
    """A Stack whose processes run from another source tree, which shadows the installed one
    (a variant's own PYTHONPATH follows the tree: a package tried out, say)."""

    def __init__(self, tree: Path, redis: RedisServer, workdir: Path, env: dict[str, str]) -> None:
        super().__init__(redis, workdir, env)
        self.tree = tree
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            argv, cwd=self.tree, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.processes[name] = process
        self.argvs[name] = argv
        return process


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in the group (gunicorn's workers never exit here)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def measure(stack: Stack, name: str, duration: float, threads: int, echo: bool) -> dict[str, float]:
    """One load at the maximum rate: req/s and the web's CPU milliseconds per request."""
    out = stack.workdir / f"load-{name}.json"
    flags = ["--probe-share", "0", *(["--echo"] if echo else [])]
    argv = command(stack.web_url, out, duration, 0.0, name, threads, *flags)
    pgid = stack.processes["web"].pid
    before = group_cpu_seconds(pgid)
    subprocess.run(argv, check=True, cwd=REPO, env=stack.env)
    spent = group_cpu_seconds(pgid) - before
    result = json.loads(out.read_text())
    return {
        "req_per_s": result["throughput"],
        "cpu_ms_per_req": spent * 1000 / max(1, result["sent"]),
        "errors": result["errors"],
    }


def env_pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--a-tree", type=Path, default=REPO)
    parser.add_argument("--b-tree", type=Path, default=REPO)
    parser.add_argument("--a-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--b-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=2, help="A B, then B A, and so on")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--web", type=int, default=2, help="gunicorn processes")
    parser.add_argument("--workers", type=int, default=0, help="RQ workers applying beside")
    parser.add_argument("--shards", type=int, default=Settings.shards)
    args = parser.parse_args()
    # Stopped early (SIGTERM), still stop every process started: they run in sessions of their own.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    with tempfile.TemporaryDirectory(prefix="webcost-") as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis")
        redis.start()
        stacks: dict[str, Stack] = {}
        try:
            variants = {
                "A": (args.a_tree, env_pairs(args.a_env), "app:app"),
                "B": (args.b_tree, env_pairs(args.b_env), "app:app"),
                "echo": (REPO, {}, "bench.echo_app:app"),
            }
            shards = {"CALLSTATE_SHARDS": str(args.shards)}
            for name, (tree, env, app) in variants.items():
                (workdir / name).mkdir()
                stacks[name] = TreeStack(tree.resolve(), redis, workdir / name, shards | env)
                stacks[name].start_web(args.web, app=app)
            if args.workers:
                (workdir / "workers").mkdir()
                stacks["workers"] = Stack(redis, workdir / "workers", shards)
                stacks["workers"].start_workers(args.workers)
            order = ["echo"]
            for n in range(args.rounds):
                order += ["A", "B"] if n % 2 == 0 else ["B", "A"]
            order.append("echo")
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
            for index, name in enumerate(order):
                figures = measure(
                    stacks[name], f"{name}-{index}", args.duration, args.threads, name == "echo"
                )
                runs[name].append(figures)
                print(name, json.dumps(figures), flush=True)
        finally:
            for stack in stacks.values():
                stack.stop()
            redis.stop()
    report(runs)


def report(runs: dict[str, list[dict[str, float]]]) -> None:
    medians = {
        name: {key: statistics.median(run[key] for run in found) for key in found[0]}
        for name, found in runs.items()
    }
    echo = medians["echo"]["req_per_s"]
    for name, median in medians.items():
        print(
            f"{name:5} median {median['req_per_s']:7.0f} req/s  "
            f"{median['cpu_ms_per_req']:.3f} ms CPU/req  "
            f"{median['req_per_s'] / echo:.2f}x echo  "
            f"runs {[round(run['req_per_s']) for run in runs[name]]}"
        )
    print(f"B/A req/s {medians['B']['req_per_s'] / medians['A']['req_per_s']:.3f}")
    print(f"B/A CPU/req {medians['B']['cpu_ms_per_req'] / medians['A']['cpu_ms_per_req']:.3f}")
    print(f"python {sys.version.split()[0]}, gunicorn {BIN / 'gunicorn'}")


if __name__ == "__main__":
    main()
