"""callstate's command line: look at calls, final records, the pipeline's figures and refused
deliveries; check the Redis server; check or rebuild the calls from the event log; run the
embedded Redis."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, astuple
from datetime import UTC, datetime
from typing import IO, Any, cast
from urllib.parse import urlparse

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue

from callstate import recordstream, streamids
from callstate.config import Settings
from callstate.connection import connect, connect_queue, distinct, text
from callstate.doctor import Finding, examine
from callstate.export import csv_lines, jsonl_lines
from callstate.figures import Figures, ShardFigures, read_figures
from callstate.forwarding import Forwarder
from callstate.health import workers_running
from callstate.history import Filters
from callstate.jobs import drain_timeout, wake_drain
from callstate.logs import configure_logging
from callstate.lookups import events_view, public_view
from callstate.machine import CallMachine
from callstate.migration import migrate, move_deliveries, unmigrated
from callstate.moments import parse_time_ms
from callstate.rebuild import Report, check, rebuild
from callstate.record import DIRECTIONS, DISPOSITIONS
from callstate.redis_server import server_argv
from callstate.store import Store
from callstate.transfer import TransferError, export_store, import_store

OK, PROBLEM, UNAVAILABLE = 0, 1, 2
EPILOG = """\
exit codes (the same for every command):
  0  done; for a check, nothing is wrong
  1  not found (show, events), a difference (rebuild --check), a problem (doctor),
     the rebuild could not run, or an export or import was refused
  2  Redis cannot be reached or failed, a setting is invalid, or the command line is wrong

Every read command takes --json: one JSON document on stdout (records --follow: one per
line). Messages go to stderr. Times are UTC; phone numbers are shown as stored.
Settings come from the environment (REDIS_URL, CALLSTATE_*), as for the service.
`callstate COMMAND --help` explains a command and its options."""
# An XREAD BLOCK must return within the client's socket timeout (callstate.connection).
FOLLOW_BLOCK_MS = 1000
LAST_ID = 2**64 - 1
MAX_LIMIT = 100_000

Command = Callable[[Store, argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"callstate: {exc}", file=sys.stderr)
        return UNAVAILABLE
    configure_logging(settings.log_format)
    if args.command == "redis":
        return run_redis(settings)
    try:
        redis = connect(settings)
        store = Store(redis, settings, connect_queue(settings, redis))
    except ValueError:  # the message would repeat the URL, and a URL may carry a password
        print("callstate: REDIS_URL is not a Redis URL (redis://host:port/db)", file=sys.stderr)
        return UNAVAILABLE
    except RedisClusterException as exc:  # a cluster's client reads its slot map when made
        print(f"callstate: cannot reach Redis at {_where(settings)}: {exc}", file=sys.stderr)
        return UNAVAILABLE
    run = cast(Command, args.run)
    try:
        if args.command not in ("migrate-keys", "doctor", "import-store"):
            why = unmigrated(store.redis, store.queue_redis, store.keys)
            if why is not None:
                print(f"callstate: {why}", file=sys.stderr)
                return UNAVAILABLE
        code = run(store, args)
        sys.stdout.flush()  # here, so a closed pipe is met inside the `except` below
        return code
    except BrokenPipeError:
        # The reader went away (`callstate records --follow | head`): nothing left to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    except (RedisConnectionError, RedisTimeoutError) as exc:
        print(f"callstate: cannot reach Redis at {_where(settings)}: {exc}", file=sys.stderr)
        return UNAVAILABLE
    except RedisError as exc:
        print(f"callstate: Redis at {_where(settings)} failed: {exc}", file=sys.stderr)
        return UNAVAILABLE


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="callstate",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    reads = argparse.ArgumentParser(add_help=False)
    reads.add_argument("--json", action="store_true", help="one JSON document, for scripts")

    def command(name: str, run: Command, summary: str, details: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, parents=[reads], help=summary, description=f"{summary}. {details}"
        )
        sub.set_defaults(run=run)
        return sub

    show = command(
        "show",
        show_call,
        "show a call: status, parties, timeline, counts, and its final record once it ended",
        "--json: the body of GET /calls/<id> with `record` added (null until the call ends).",
    )
    show.add_argument("call_id", metavar="ID")
    events = command(
        "events",
        show_events,
        "show a call's events in arrival order, with the verdict on each",
        "--json: the body of GET /calls/<id>/events, logged payloads included.",
    )
    events.add_argument("call_id", metavar="ID")
    active = command(
        "active",
        show_active,
        "list active calls, most recently heard from first",
        "--json: the body of GET /calls?active=true.",
    )
    active.add_argument("--number", help="only calls from or to this number")
    active.add_argument("--user", help="only calls of this request_from_user_id")
    active.add_argument("--limit", type=_positive, default=50, help="at most this many (50)")
    records = command(
        "records",
        show_records,
        "show final call records from the records stream, oldest first",
        "Without --since, the last --limit records. --json: a list of {id, call_id, record}.",
    )
    records.add_argument(
        "--since",
        type=_since_ms,
        metavar="T",
        help="records from this time on: ISO 8601 (UTC unless it has an offset) or Unix ms",
    )
    records.add_argument(
        "--follow",
        action="store_true",
        help="then print every later record as it comes, until Ctrl-C (exit 0); "
        "with --json, one JSON object per line",
    )
    records.add_argument("--limit", type=_positive, default=20, help="at most this many (20)")
    records_commands = records.add_subparsers(dest="records_command", metavar="SUBCOMMAND")
    add_records_export(records_commands)
    add_records_redeliver(records_commands, reads)
    command(
        "stats",
        show_stats,
        "show the pipeline's figures, the same as GET /metrics reads: per shard and in total",
        "Events logged and applied, backlog and the age of its oldest entry, verdicts, active "
        "calls by status, records, drain job durations, the quarantine.",
    )
    quarantine = command(
        "quarantine",
        show_quarantine,
        "show refused deliveries and unprocessable log entries, newest first",
        "Bodies are masked; --json shows them (the first 2 KiB).",
    )
    quarantine.add_argument("--limit", type=_positive, default=20, help="at most this many (20)")
    rebuild_cmd = command(
        "rebuild",
        run_rebuild,
        "re-derive every call from its shard's snapshot and event log, and rewrite what differs",
        "Holds every shard's drain lock while it runs. Exit 1 when it could not run.",
    )
    rebuild_cmd.add_argument(
        "--check", action="store_true", help="only compare, on a live system; exit 1 if any differ"
    )
    migrate_cmd = command(
        "migrate-keys",
        run_migrate_keys,
        "move a store written before the keys carried their shard's hash tag to today's layout",
        "Run once after upgrading, with the web and the workers stopped: the service refuses "
        "to start on the old layout. Keys keep their contents and TTLs. Exit 1 when a key "
        "could not move (its new name exists); then run `rebuild --check`.",
    )
    migrate_cmd.add_argument(
        "--check", action="store_true", help="only count the keys to move; exit 1 if any"
    )
    export_cmd = commands.add_parser(
        "export-store",
        help="write the whole store, drained, as JSON Lines (to move it: see import-store)",
        description="Write the store (logs, snapshots, documents, tombstones, records streams "
        "and history, outboxes, dead letters, quarantine, counters) as JSON Lines: a header "
        "(format version, key prefix, shard count, lines of each kind), the lines, an end line. "
        "Refused (exit 1) unless the store is drained: no worker running, no shard held, "
        "every logged entry applied. Exit 1 too if the store changed while it was read.",
    )
    export_cmd.set_defaults(run=run_export_store)
    export_cmd.add_argument("--output", metavar="FILE", help="write here, not to stdout")
    import_cmd = commands.add_parser(
        "import-store",
        help="read an export-store file into this empty Redis, under its own CALLSTATE_SHARDS",
        description="Read what export-store wrote into an empty store: each call, its log "
        "entries, snapshot copy, tombstone and records go to its shard under this "
        "deployment's CALLSTATE_SHARDS, which may differ from the source's. Refused (exit 1) "
        "if the store holds any key under the prefix, or its workers run. Then run "
        "`callstate rebuild --check`.",
    )
    import_cmd.set_defaults(run=run_import_store)
    import_cmd.add_argument("--input", metavar="FILE", help="read this, not stdin")
    command(
        "doctor",
        run_doctor,
        "check the Redis server's settings against what the guarantees need",
        "Exit 1 when one is off.",
    )
    commands.add_parser(
        "redis",
        help="run the embedded Redis (the Procfile's); with REDIS_URL set, idle",
        description="Run the embedded Redis server in the foreground; with REDIS_URL set, idle "
        "until stopped, so a Procfile keeps going.",
    )
    return top


def add_records_export(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`records export`: a sub-command of `records`, which without one still reads the stream."""
    export = subcommands.add_parser(
        "export",
        help="write the records history to stdout as CSV or JSON Lines, newest first",
        description="Write the records history (each call's latest revision, kept for "
        "CALLSTATE_RECORD_RETENTION_DAYS) to stdout, newest first, as GET /records.csv or "
        "/records.jsonl would; times are the calls' end times.",
    )
    export.set_defaults(run=export_records)
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="(csv)")
    when = "ISO 8601 (UTC unless it has an offset) or Unix ms"
    export.add_argument("--since", type=_since_ms, metavar="T", help=f"ended at or after: {when}")
    export.add_argument("--until", type=_since_ms, metavar="T", help=f"ended before: {when}")
    export.add_argument("--disposition", choices=DISPOSITIONS)
    export.add_argument("--direction", choices=DIRECTIONS)
    export.add_argument("--number", help="only calls from or to this number")
    export.add_argument("--user", help="only calls of this request_from_user_id")


def export_records(store: Store, args: argparse.Namespace) -> int:
    since_ms = args.since or 0
    if args.until is not None and args.until <= since_ms:
        print("callstate: --until must be later than --since", file=sys.stderr)
        return UNAVAILABLE
    filters = Filters(args.disposition, args.direction, args.number or None, args.user or None)
    found = store.history.iter_records(since_ms, args.until, filters)
    lines = csv_lines(found) if args.format == "csv" else jsonl_lines(found)
    sys.stdout.writelines(lines)
    return OK


def add_records_redeliver(
    subcommands: argparse._SubParsersAction[argparse.ArgumentParser],
    reads: argparse.ArgumentParser,
) -> None:
    """`records redeliver`: a sub-command of `records`, which without one reads the stream."""
    redeliver = subcommands.add_parser(
        "redeliver",
        parents=[reads],
        help="send the forwarding's dead letters again, with a fresh retry schedule",
        description="Queue every dead letter (a record revision whose delivery failed for the "
        "whole retry schedule) for delivery again, each taken off its list in the transaction "
        "that queues it; letters for a receiver no longer in CALLSTATE_RECORD_WEBHOOK_URL are "
        "kept. The retrier (python -m workers.records --retries) sends them.",
    )
    redeliver.set_defaults(run=redeliver_records)


def redeliver_records(store: Store, args: argparse.Namespace) -> int:
    queued, kept = Forwarder(store.redis, store.settings, store.queue_redis).redeliver()
    if args.json:
        _print_json({"queued": queued, "kept": kept})
        return OK
    print(f"{queued} dead letters queued for delivery again")
    if kept:
        print(f"{kept} kept: their receiver is no longer in CALLSTATE_RECORD_WEBHOOK_URL")
    return OK


def show_call(store: Store, args: argparse.Namespace) -> int:
    doc = store.docs.get_doc(args.call_id)
    if doc is None:
        return _not_found(args.call_id, as_json=args.json)
    view = {**public_view(doc), "record": doc["record"]}
    if args.json:
        _print_json(view)
        return OK
    rows: list[tuple[str, Any]] = [
        ("call", view["call_id"]),
        ("status", view["status"]),
        ("active", "yes" if view["active"] else "no"),
        ("from", _party(view["from"])),
        ("to", _party(view["to"])),
        ("user", view["request_from_user_id"]),
        ("closed by", view["closed_by"]),
        ("version", view["version"]),
        ("last event", _time(view["last_timestamp_ms"])),
        ("last received", _time(view["last_received_ms"])),
        ("counts", _pairs(view["counts"])),
        *(
            ("" if n else "timeline", f"{status:<10} {_time(ms)}")
            for n, (status, ms) in enumerate(view["timeline"].items())
        ),
        ("record", _record_summary(view["record"])),
    ]
    if view["overflow"]:
        rows.append(("overflow", _pairs(view["overflow"])))
    print(_table(None, rows))
    return OK


def show_events(store: Store, args: argparse.Namespace) -> int:
    doc = store.docs.get_doc(args.call_id)
    if doc is None:
        return _not_found(args.call_id, as_json=args.json)
    events = events_view(store, doc)
    if args.json:
        _print_json({"call_id": args.call_id, "events": events})
        return OK
    print(
        _table(
            ("LOG ID", "RECEIVED", "STATUS", "EVENT TIME", "VERDICT", "REASON"),
            (
                (
                    item["log_id"],
                    _time(item["received_ms"]),
                    item["call_status"],
                    _time(item["timestamp_ms"]),
                    item["verdict"],
                    _reason(item),
                )
                for item in events
            ),
        )
    )
    return OK


def show_active(store: Store, args: argparse.Namespace) -> int:
    total, docs = store.docs.active_calls(args.number, args.user, 0, args.limit)
    views = [public_view(doc) for doc in docs]
    if args.json:
        _print_json({"total": total, "offset": 0, "limit": args.limit, "calls": views})
        return OK
    now_ms = store.log.server_time_ms()
    print(
        _table(
            ("CALL", "STATUS", "SINCE", "FROM", "TO", "USER", "LAST HEARD"),
            (
                (
                    view["call_id"],
                    view["status"],
                    _time(view["timeline"].get(view["status"])),
                    _party(view["from"]),
                    _party(view["to"]),
                    view["request_from_user_id"],
                    _ago(now_ms, view["last_received_ms"]),
                )
                for view in views
            ),
        )
    )
    print(f"{len(views)} of {total} active calls")
    return OK


RECORD_COLUMNS = (
    ("LOGGED", 23),
    ("CALL", 28),
    ("REV", 3),
    ("DISPOSITION", 11),
    ("SIP", 3),
    ("DURATION", 8),
    ("ANSWERED", 8),
    ("DIRECTION", 9),
    ("FROM", 15),
    ("TO", 15),
    ("CLOSED BY", 0),
)


def show_records(store: Store, args: argparse.Namespace) -> int:
    if args.since is None:
        rows = recordstream.newest(store.redis, store.keys, args.limit)[::-1]
    else:
        rows = recordstream.since(store.redis, store.keys, args.since, args.limit)
    shown = [_stream_record(row) for row in rows]
    if args.json and not args.follow:
        _print_json(shown)
        return OK
    if not args.json:
        print(_fixed_row([name for name, _ in RECORD_COLUMNS]))
    for item in shown:
        _print_record(item, as_json=args.json)
    if not args.follow:
        return OK
    # A shard none of whose records was shown had none later than the oldest one shown.
    start = _before(args.since) if args.since is not None or not rows else rows[0].entry_id
    seen = recordstream.positions(store.keys, start)
    seen.update({store.keys.records(row.shard): row.entry_id for row in rows})
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a follow ends
        _follow(store, seen, as_json=args.json)
    return OK


def _follow(store: Store, seen: dict[str, str], *, as_json: bool) -> None:
    """Print every record appended after the positions `seen`, as it comes, until
    interrupted."""
    while True:
        for row in recordstream.after(store.redis, store.keys, seen, FOLLOW_BLOCK_MS):
            _print_record(_stream_record(row), as_json=as_json)


def _stream_record(row: recordstream.StreamRecord) -> dict[str, Any]:
    return {
        "id": row.entry_id,
        "shard": row.shard,
        "call_id": text(row.fields[b"call_id"]),
        "record": json.loads(row.fields[b"record"]),
    }


def _print_record(item: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(item, ensure_ascii=False), flush=True)
        return
    record = item["record"]
    values = (
        _time(streamids.millis(item["id"])),
        item["call_id"],
        record.get("revision"),
        record.get("disposition"),
        record.get("sip_code"),
        _seconds(record.get("duration")),
        _seconds(record.get("answerDuration")),
        record.get("direction"),
        _party(record.get("from")),
        _party(record.get("to")),
        record.get("closed_by"),
    )
    print(_fixed_row([_cell(value) for value in values]), flush=True)


def _fixed_row(cells: Sequence[str]) -> str:
    widths = [width for _, width in RECORD_COLUMNS]
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


STATS_COLUMNS = ("SHARD", "LOGGED", "APPLIED", "BACKLOG", "OLDEST", "RECORDS", "ACTIVE", "DRAINS")


def show_stats(store: Store, args: argparse.Namespace) -> int:
    figures = read_figures(store)
    if args.json:
        _print_json(_figures_json(figures))
        return OK
    rows = [_stats_row(shard.shard, [shard]) for shard in figures.shards]
    print(f"as of {_time(figures.server_ms)} UTC (Redis' clock)\n")
    print(_table((*STATS_COLUMNS, "MEAN DRAIN"), [*rows, _stats_row("all", figures.shards)]))
    print()
    print(_table(("VERDICT", "ENTRIES"), sorted(figures.verdicts.items())))
    print()
    print(_table(("ACTIVE STATUS", "CALLS"), sorted(figures.active.items())))
    print(f"\nquarantine: {figures.quarantine_size} kept, {figures.quarantined} quarantined in all")
    forwarding = figures.forwarding
    if store.settings.forwarding or any(astuple(forwarding)):
        print(
            f"forwarding: {forwarding.delivered} delivered, {forwarding.failed} failed attempts, "
            f"{forwarding.retrying} retrying, {forwarding.outbox} in the outboxes, "
            f"{forwarding.dead_lettered} dead-lettered ({forwarding.dead_letters} kept)"
        )
    return OK


def _stats_row(name: int | str, shards: list[ShardFigures]) -> tuple[Any, ...]:
    """One line of the stats table: one shard's figures, or the sum of several."""
    backlog = sum(shard.backlog.entries for shard in shards)
    ages = [shard.backlog.oldest_seconds for shard in shards]
    oldest = max((age for age in ages if age is not None), default=None)
    drains = sum(shard.drain_seconds.count for shard in shards)
    drain_seconds = sum(shard.drain_seconds.sum for shard in shards)
    return (
        name,
        sum(shard.logged for shard in shards),
        sum(shard.applied for shard in shards),
        backlog,
        None if oldest is None else f"{oldest:.1f}s",
        sum(shard.records for shard in shards),
        sum(sum(shard.active.values()) for shard in shards),
        drains,
        f"{drain_seconds / drains * 1000:.1f}ms" if drains else None,
    )


def _figures_json(figures: Figures) -> dict[str, Any]:
    """The figures as JSON, totals first; a histogram's last bound is "+Inf", as in /metrics."""
    shards = [asdict(shard) for shard in figures.shards]
    for histogram in (shard[name] for shard in shards for name in ("drain_seconds", "apply_lag")):
        histogram["buckets"] = [
            ["+Inf" if math.isinf(bound) else bound, count] for bound, count in histogram["buckets"]
        ]
    return {
        "server_ms": figures.server_ms,
        "logged": figures.logged,
        "applied": figures.applied,
        "backlog": sum(shard.backlog.entries for shard in figures.shards),
        "records": figures.records,
        "verdicts": figures.verdicts,
        "active": figures.active,
        "active_total": figures.active_total,
        "quarantined": figures.quarantined,
        "quarantine_size": figures.quarantine_size,
        "forwarding": asdict(figures.forwarding),
        "shards": shards,
    }


def show_quarantine(store: Store, args: argparse.Namespace) -> int:
    items = store.quarantine.recent(args.limit)
    if args.json:
        _print_json(items)
        return OK
    print(
        _table(
            ("RECEIVED", "STATUS", "ERROR", "FIELD", "BYTES", "WHERE", "MESSAGE"),
            (
                (
                    _time(item.get("received_ms")),
                    item.get("status"),
                    item.get("error"),
                    item.get("field"),
                    item.get("bytes"),
                    _log_place(item),
                    item.get("message"),
                )
                for item in items
            ),
        )
    )
    return OK


def _log_place(item: dict[str, Any]) -> str | None:
    """Where an unprocessable entry stays: its call, log id and shard."""
    if item.get("log_id") is None:
        return None
    return f"{item.get('call_id') or '?'} {item['log_id']} (shard {item.get('shard')})"


def run_doctor(store: Store, args: argparse.Namespace) -> int:
    """Each setting with `ok` or `PROBLEM`, and the queue's server's too when it is another (it
    holds the delivery jobs' state); exit 1 when any guarantee is not met."""
    findings = examine(store.redis)
    queue = examine(store.queue_redis) if store.queue_redis is not store.redis else None
    healthy = all(finding.ok for finding in [*findings, *(queue or [])])
    if args.json:
        found = {"ok": healthy, "findings": [asdict(finding) for finding in findings]}
        if queue is not None:
            found["queue_findings"] = [asdict(finding) for finding in queue]
        _print_json(found)
        return OK if healthy else PROBLEM
    _print_findings(findings)
    if queue is not None:
        print("\nthe queue's server (CALLSTATE_QUEUE_URL or CALLSTATE_QUEUE_SENTINEL_MASTER):")
        _print_findings(queue)
    return OK if healthy else PROBLEM


def _print_findings(findings: list[Finding]) -> None:
    for finding in findings:
        mark = "ok" if finding.ok else "PROBLEM"
        print(f"{mark:<8} {finding.setting} = {finding.found} (needs {finding.needed})")
        if not finding.ok:
            print(f"         {finding.why}")


def run_migrate_keys(store: Store, args: argparse.Namespace) -> int:
    """Move the old layout's keys on the data Redis and, when it is another, the queue's;
    then the delivery state a deployment left on the data Redis before its queues moved.
    Refused while a worker has a live heartbeat."""
    # The forwarder and the retrier too: the old release's would run deliveries on old names.
    if not args.check and workers_running(store):
        print("migrate-keys: stop the workers first (some have a live heartbeat)", file=sys.stderr)
        return PROBLEM
    servers = distinct(store.redis, store.queue_redis)
    runs = [migrate(redis, store.keys, check_only=args.check) for redis in servers]
    renamed = sum((run.renamed for run in runs), Counter[str]())
    split = sum((run.split for run in runs), Counter[str]())
    conflicts = [key for run in runs for key in run.conflicts]
    moved = None if args.check else move_deliveries(store.redis, store.queue_redis, store.keys)
    left = unmigrated(store.redis, store.queue_redis, store.keys)
    if args.json:
        found = {"renamed": renamed, "split": split, "conflicts": conflicts, "left": left}
        _print_json(found)
    else:
        verb = "to move" if args.check else "moved"
        print(f"{sum(renamed.values())} keys renamed, {sum(split.values())} split {verb}")
        for family, count in sorted((renamed + split).items()):
            print(f"  {family}: {count}")
        if moved:
            print(f"{moved} dead-letter lists and delivery counts moved to the queue's Redis")
        for key in conflicts[:20]:
            print(f"not moved, its new name exists: {key}")
        if left is not None:
            print(f"left: {left}")
    to_move = args.check and bool(renamed or split)
    return PROBLEM if conflicts or left is not None or to_move else OK


def run_export_store(store: Store, args: argparse.Namespace) -> int:
    try:
        with _opened(args.output, "w") as out:
            written = export_store(store, out)
    except TransferError as exc:
        print(f"export-store: {exc}", file=sys.stderr)
        return PROBLEM
    print(f"exported {_kinds(written)}", file=sys.stderr)
    return OK


def run_import_store(store: Store, args: argparse.Namespace) -> int:
    try:
        with _opened(args.input, "r") as lines:
            read = import_store(store, lines)
    except TransferError as exc:
        print(f"import-store: {exc}", file=sys.stderr)
        return PROBLEM
    except (ValueError, KeyError, TypeError) as exc:
        print(f"import-store: not a valid export ({type(exc).__name__}: {exc})", file=sys.stderr)
        return PROBLEM
    print(f"imported {_kinds(read)} into {store.settings.shards} shards", file=sys.stderr)
    if read["pending"]:
        print(
            f"{read['pending']} deliveries that waited for a retry are dead letters now: "
            "run `callstate records redeliver` once the records workers run",
            file=sys.stderr,
        )
    return OK


@contextlib.contextmanager
def _opened(path: str | None, mode: str) -> Iterator[IO[str]]:
    """The file named, or stdin/stdout for none."""
    if path is None:
        yield sys.stdout if mode == "w" else sys.stdin
        return
    with open(path, mode, encoding="ascii") as found:
        yield found


def _kinds(counts: Counter[str]) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))


def run_rebuild(store: Store, args: argparse.Namespace) -> int:
    """What was compared, what differs and what is left as stored (and why); exit 1 when
    something differs (with `--check`) or the rebuild could not run."""
    machine = CallMachine()
    try:
        report = check(store, machine) if args.check else _rebuild(store, machine)
    except RuntimeError as exc:
        print(f"rebuild: {exc}", file=sys.stderr)
        return PROBLEM
    if args.json:
        _print_json(asdict(report))
    else:
        _print_report(report, check_only=args.check)
    return PROBLEM if args.check and report.differing else OK


def _rebuild(store: Store, machine: CallMachine) -> Report:
    try:
        return rebuild(store, machine)
    finally:
        _wake_left_shards(store)


def _print_report(report: Report, *, check_only: bool) -> None:
    if check_only:
        print(f"{report.compared} calls compared, {len(report.differing)} differ")
    else:
        print(f"{report.compared} calls compared, {report.rewritten} rewritten from the log")
    for call_id in report.differing[:20]:
        print(f"differs: {call_id}")
    for call_id, reason in sorted(report.left.items())[:20]:
        print(f"left as stored ({reason}): {call_id}")


def _wake_left_shards(store: Store) -> None:
    """Drain jobs that found a shard locked by the rebuild left it to the rebuild: wake them."""
    settings = store.settings
    queue = Queue(settings.queue_name, connection=store.queue_redis)
    for shard in range(settings.shards):
        if store.log.has_backlog(shard):
            wake_drain(store, queue, shard, drain_timeout(settings))


def run_redis(settings: Settings) -> int:
    """Become the embedded Redis server; with REDIS_URL or REDIS_SENTINELS set, stay idle so a
    Procfile keeps going."""
    if not settings.embedded_redis:
        print("REDIS_URL or REDIS_SENTINELS is set: not starting the embedded Redis", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return OK
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    port = urlparse(settings.redis_url).port
    assert port is not None
    argv = server_argv(port, settings.var_dir, settings.fsync)
    os.execv(argv[0], argv)  # noqa: S606 - the Procfile line becomes the server itself


def _table(headers: Sequence[str] | None, rows: Iterable[Sequence[Any]]) -> str:
    """Plain aligned columns: numbers to the right, the rest to the left, `-` for nothing."""
    raw = [list(row) for row in rows]
    cells = [[_cell(value) for value in row] for row in raw]
    lines = ([list(headers)] if headers else []) + cells
    if not lines:
        return ""
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    numeric = [_numeric([row[column] for row in raw]) for column in range(len(widths))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(line, widths, numeric, strict=True)
        ).rstrip()
        for line in lines
    )


def _numeric(column: list[Any]) -> bool:
    present = [value for value in column if value is not None]
    return bool(present) and all(_is_number(value) for value in present)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _time(ms: Any) -> str | None:
    """A Unix time in ms as UTC, to the millisecond; what is not one, as it is."""
    if not _is_number(ms):
        return None if ms is None else str(ms)
    try:
        moment = datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return str(ms)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _ago(now_ms: int, then_ms: int | None) -> str | None:
    return None if then_ms is None else f"{max(0, now_ms - then_ms) // 1000}s ago"


def _seconds(value: Any) -> str | None:
    return f"{value}s" if _is_number(value) else None


def _party(value: Any) -> Any:
    """A `from` or `to`: its number (or alias), as an operator dials it."""
    if isinstance(value, dict):
        return value.get("number") or value.get("alias")
    return value


def _pairs(values: dict[str, Any]) -> str:
    return " ".join(f"{name}={value}" for name, value in values.items())


def _reason(item: dict[str, Any]) -> str | None:
    reason, problem = item.get("reason"), item.get("error")
    return f"{reason} ({problem})" if reason and problem else reason or problem


def _record_summary(record: dict[str, Any] | None) -> str | None:
    if record is None:
        return None
    return (
        f"revision {record.get('revision')}: {record.get('disposition')}, "
        f"SIP {_cell(record.get('sip_code'))}, {_cell(_seconds(record.get('duration')))} long, "
        f"{_cell(_seconds(record.get('answerDuration')))} answered, "
        f"{record.get('direction')}, closed by {record.get('closed_by')}"
    )


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


def _not_found(call_id: str, *, as_json: bool) -> int:
    """Exit 1; with --json, the API's 404 body on stdout too, so a script always gets JSON."""
    if as_json:
        _print_json({"error": "not_found", "message": "no such call", "call_id": call_id})
    print(f"callstate: no such call: {call_id}", file=sys.stderr)
    return PROBLEM


def _where(settings: Settings) -> str:
    """The server's address without the password a REDIS_URL may carry."""
    if settings.sentinels:
        return f"{settings.sentinel_master} (sentinels {','.join(settings.sentinels)})"
    if settings.cluster_nodes:
        return f"the cluster of {','.join(settings.cluster_nodes)}"
    url = urlparse(settings.redis_url)
    return f"{url.hostname}:{url.port}" if url.hostname else url.path


def _positive(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"an integer from 1 to {MAX_LIMIT}, not {raw!r}")
    return int(raw)


def _since_ms(raw: str) -> int:
    """Unix milliseconds, or an ISO 8601 time (UTC when it names no offset)."""
    try:
        return parse_time_ms(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _before(since_ms: int | None) -> str:
    """The stream id just before `since_ms` (XREAD reads after an id), or the stream's start."""
    return f"{since_ms - 1}-{LAST_ID}" if since_ms else "0-0"


if __name__ == "__main__":
    sys.exit(main())
