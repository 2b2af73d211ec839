"""`callstate` command line: run the embedded Redis, rebuild from the log, show the quarantine."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from urllib.parse import urlparse

from redis.exceptions import RedisError
from rq import Queue

from callstate.config import Settings
from callstate.connection import connect
from callstate.doctor import examine
from callstate.jobs import drain_timeout, wake_drain
from callstate.machine import CallMachine
from callstate.rebuild import check, rebuild
from callstate.redis_server import server_argv
from callstate.store import Store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callstate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("redis", help="run the embedded Redis (unless REDIS_URL is set)")
    rebuild_cmd = commands.add_parser("rebuild", help="re-derive all calls from the event log")
    rebuild_cmd.add_argument(
        "--check", action="store_true", help="only compare; exit 1 if anything differs"
    )
    quarantine_cmd = commands.add_parser("quarantine", help="show rejected deliveries")
    quarantine_cmd.add_argument("--limit", type=int, default=20)
    commands.add_parser(
        "doctor", help="check the Redis server's settings against what the guarantees need"
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if args.command == "redis":
        return run_redis(settings)
    store = Store(connect(settings.redis_url), settings)
    if args.command == "rebuild":
        return run_rebuild(store, settings, check_only=args.check)
    if args.command == "doctor":
        return run_doctor(store)
    for item in store.quarantine.recent(args.limit):
        print(json.dumps(item, ensure_ascii=False))
    return 0


def run_redis(settings: Settings) -> int:
    """Become the embedded Redis server; with REDIS_URL set, stay idle so a Procfile keeps going."""
    if not settings.embedded_redis:
        print("REDIS_URL is set: using that server, not starting the embedded one", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    port = urlparse(settings.redis_url).port
    assert port is not None
    argv = server_argv(port, settings.var_dir, settings.fsync)
    os.execv(argv[0], argv)  # noqa: S606 - the Procfile line becomes the server itself


def run_doctor(store: Store) -> int:
    """Print each setting with `ok` or `PROBLEM`; exit 1 when any guarantee is not met, 2 when
    the server cannot be reached."""
    try:
        findings = examine(store.redis)
    except RedisError as exc:
        print(f"cannot reach Redis at {store.settings.redis_url}: {exc}", file=sys.stderr)
        return 2
    for finding in findings:
        mark = "ok" if finding.ok else "PROBLEM"
        print(f"{mark:<8} {finding.setting} = {finding.found} (needs {finding.needed})")
        if not finding.ok:
            print(f"         {finding.why}")
    return 0 if all(finding.ok for finding in findings) else 1


def run_rebuild(store: Store, settings: Settings, *, check_only: bool) -> int:
    """Print what was compared, what differs and what is left as stored (and why); exit 1 when
    something differs (with `--check`) or the rebuild could not run."""
    machine = CallMachine()
    if check_only:
        report = check(store, machine)
        print(f"{report.compared} calls compared, {len(report.differing)} differ")
    else:
        try:
            report = rebuild(store, machine)
        except RuntimeError as exc:
            print(f"rebuild: {exc}", file=sys.stderr)
            return 1
        finally:
            _wake_left_shards(store, settings)
        print(f"{report.compared} calls compared, {report.rewritten} rewritten from the log")
    for call_id in report.differing[:20]:
        print(f"differs: {call_id}")
    for call_id, reason in sorted(report.left.items())[:20]:
        print(f"left as stored ({reason}): {call_id}")
    return 1 if check_only and report.differing else 0


def _wake_left_shards(store: Store, settings: Settings) -> None:
    """Drain jobs that found a shard locked by the rebuild left it to the rebuild: wake them."""
    queue = Queue(settings.queue_name, connection=store.redis)
    for shard in range(settings.shards):
        if store.log.has_backlog(shard):
            wake_drain(store, queue, shard, drain_timeout(settings))


if __name__ == "__main__":
    sys.exit(main())
