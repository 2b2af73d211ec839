"""What the records history costs on a real Redis server: memory per stored record (INFO
used_memory before and after), a page's and an export's time, the export's peak Python memory,
and the retention trim. `python -m bench.history [--records N]`; JSON into bench/results/.

The records are real ones (five kinds of call, built by the drainer from provider events),
copied under new call ids, times and numbers: every call has a callee number of its own (the
worst case for the number index), its caller is one of 200 numbers, its user one of 50."""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import requests

from bench.results_file import write_figures
from callstate.calldoc import Record
from callstate.config import Settings
from callstate.drain import Drainer
from callstate.eventlog import event_fields
from callstate.export import csv_lines
from callstate.history import DAY_MS, Filters
from callstate.machine import CallMachine
from callstate.store import Store
from tests.factories import SCENARIOS, body, scenario
from tests.integration.stack import RedisServer, Stack

START_MS = 1_764_000_000_000
WRITE_BATCH = 1000
APPLY_CALLS = 10_000


def real_records(store: Store) -> list[Record]:
    """One record of each kind of call, as the drainer builds them."""
    for n, kind in enumerate(SCENARIOS):
        for payload in scenario(f"sample-{n}", kind, START_MS):
            store.log.append_event(payload["call_id"], body(payload))
    drainer = Drainer(store, CallMachine(), 500, 60_000, 0, 0, lambda shard: None)
    for shard in range(store.settings.shards):
        drainer.drain(shard)
    found = []
    for n in range(len(SCENARIOS)):
        doc = store.docs.get_doc(f"sample-{n}")
        assert doc is not None and doc["record"] is not None
        found.append(doc["record"])
    return found


def variant(sample: Record, n: int) -> Record:
    """The sample as call `n`: its own id, times a second apart, callee, caller and user."""
    record = copy.deepcopy(sample)
    shift = n * 1000
    record["call_id"] = f"call-vn-1-BENCH{n:08d}-{START_MS + shift}"
    record["timeline"] = {k: v + shift for k, v in record["timeline"].items()}
    record["from"] = dict(record["from"], number=f"8489{n % 200:07d}", alias=f"8489{n % 200:07d}")
    record["to"] = dict(record["to"], number=f"8490{n:07d}", alias=f"8490{n:07d}")
    record["request_from_user_id"] = f"agent-{n % 50}"
    return record


def used_memory(store: Store) -> int:
    return int(store.redis.info("memory")["used_memory"])


def write(store: Store, samples: list[Record], count: int) -> None:
    for first in range(0, count, WRITE_BATCH):
        batch = [variant(samples[n % len(samples)], n) for n in range(first, first + WRITE_BATCH)]
        with store.redis.pipeline() as pipe:
            store.history.queue_records(pipe, batch[: count - first], {})
            pipe.execute()


def timed(step: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = step()
    return result, round(time.perf_counter() - started, 4)


def export_peak(store: Store) -> tuple[int, float, int]:
    """Rows, seconds and tracemalloc's peak bytes of a whole CSV export, lines discarded as a
    streamed response discards them."""
    tracemalloc.start()
    started = time.perf_counter()
    rows = sum(1 for _ in csv_lines(store.history.iter_records(0, None, Filters()))) - 1
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return rows, round(seconds, 2), peak


def log_calls(store: Store, calls: int) -> int:
    """Log `calls` calls of the five kinds (4 events a call on average), as the webhook
    would, with log ids a millisecond apart; return how many events."""
    pipe, events = store.redis.pipeline(transaction=False), 0
    for n in range(calls):
        call_id = f"apply-{n}"
        log_key = store.keys.log(store.keys.shard_of(call_id))
        for payload in scenario(call_id, SCENARIOS[n % 5], START_MS + n * 100):
            events += 1
            pipe.xadd(log_key, event_fields(call_id, body(payload)), id=f"{START_MS + events}-0")
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()
    return events


def redis_cpu_seconds(store: Store) -> float:
    cpu = store.redis.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def apply_cost(store: Store, calls: int) -> dict[str, Any]:
    """Applying a backlog of `calls` calls with the history written in the commits and
    without, alternated on, off, off, on: events per second, and CPU per event of the
    drainer (this process) and of Redis, which other jobs on the machine disturb less."""
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    history = store.history
    writes, previous = history.queue_records, history.previous
    for mode in ("on", "off", "off", "on"):
        store.redis.flushall()
        events = log_calls(store, calls)
        if mode == "off":
            history.queue_records = lambda *args: None  # type: ignore[method-assign]
            history.previous = lambda records, known: known  # type: ignore[method-assign]
        drainer = Drainer(store, CallMachine(), 500, 600_000, 0, 0, lambda shard: None)
        wall, cpu, redis_cpu = time.perf_counter(), time.process_time(), redis_cpu_seconds(store)
        applied = sum(drainer.drain(shard) for shard in range(store.settings.shards))
        assert applied == events
        runs[mode].append(
            {
                "events_per_second": round(applied / (time.perf_counter() - wall)),
                "drainer_cpu_us_per_event": round((time.process_time() - cpu) / applied * 1e6, 1),
                "redis_cpu_us_per_event": round(
                    (redis_cpu_seconds(store) - redis_cpu) / applied * 1e6, 1
                ),
            }
        )
        history.queue_records, history.previous = writes, previous  # type: ignore[method-assign]
    store.redis.flushall()
    return {"calls": calls, "events": events, "runs": runs}


def web_export_peaks(server: RedisServer, workdir: Path, count: int) -> dict[str, Any]:
    """The peak RSS of the one gunicorn worker (VmHWM) after streaming a tenth of the records
    as CSV over HTTP, then after streaming all of them: equal if the export's memory is flat."""
    stack = Stack(server, workdir, {"CALLSTATE_SHARDS": "4"})
    stack.start_web(processes=1)
    try:
        master = stack.processes["web"].pid
        worker = int(Path(f"/proc/{master}/task/{master}/children").read_text().split()[0])
        found: dict[str, Any] = {}
        for name, query in (
            ("tenth", f"?until={START_MS + count // 10 * 1000}"),
            ("all", ""),
        ):
            started = time.perf_counter()
            with requests.get(f"{stack.web_url}/records.csv{query}", stream=True, timeout=60) as r:
                size = sum(len(chunk) for chunk in r.iter_content(65536))
            found[name] = {
                "bytes": size,
                "seconds": round(time.perf_counter() - started, 2),
                "worker_peak_rss_kib": _peak_rss_kib(worker),
            }
        return found
    finally:
        stack.stop()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def measure(store: Store, count: int, server: RedisServer, workdir: Path) -> dict[str, Any]:
    figures_apply = apply_cost(store, APPLY_CALLS)
    samples = real_records(store)
    store.redis.delete(*store.redis.keys("cs:{s*}:history*"))
    figures: dict[str, Any] = {"records": count, "shards": store.settings.shards}
    figures["apply"] = figures_apply
    before = used_memory(store)
    _, figures["write_seconds"] = timed(lambda: write(store, samples, count))
    after = used_memory(store)
    figures["used_memory_delta_bytes"] = after - before
    figures["bytes_per_record"] = round((after - before) / count)
    figures["hash_bytes_per_record"] = round(
        sum(
            int(store.redis.memory_usage(store.keys.history(s)) or 0)
            for s in range(store.settings.shards)
        )
        / count
    )
    figures["end_index_bytes_per_record"] = round(
        sum(
            int(store.redis.memory_usage(store.keys.history_by_end(s)) or 0)
            for s in range(store.settings.shards)
        )
        / count
    )
    page, figures["first_page_50_seconds"] = timed(
        lambda: store.history.page(0, None, Filters(), 50, None)
    )
    _, figures["next_page_50_seconds"] = timed(
        lambda: store.history.page(0, None, Filters(), 50, page.next_after)
    )
    _, figures["page_by_user_50_seconds"] = timed(
        lambda: store.history.page(0, None, Filters(user="agent-7"), 50, None)
    )
    _, figures["page_busy_only_50_seconds"] = timed(
        lambda: store.history.page(0, None, Filters(disposition="busy"), 50, None)
    )
    exported, figures["export_csv_untraced_seconds"] = timed(
        lambda: sum(1 for _ in csv_lines(store.history.iter_records(0, None, Filters())))
    )
    figures["export_csv_untraced_rows_per_second"] = round(
        (exported - 1) / figures["export_csv_untraced_seconds"]
    )
    rows, seconds, peak = export_peak(store)
    figures["export_csv"] = {"rows": rows, "seconds": seconds, "peak_python_bytes": peak}
    figures["web_export_csv"] = web_export_peaks(server, workdir, count)
    tenth = store.history.iter_records(0, START_MS + count // 10 * 1000, Filters())
    tracemalloc.start()
    rows = sum(1 for _ in csv_lines(tenth)) - 1
    figures["export_csv_tenth"] = {
        "rows": rows,
        "peak_python_bytes": tracemalloc.get_traced_memory()[1],
    }
    tracemalloc.stop()
    now_ms = START_MS + count * 1000 + 91 * DAY_MS
    runs, started = [], time.perf_counter()
    while (trimmed := store.history.trim(now_ms)) > 0:
        runs.append(trimmed)
    figures["trim"] = {"per_run": runs, "seconds": round(time.perf_counter() - started, 2)}
    figures["used_memory_after_trim_delta_bytes"] = used_memory(store) - before
    return figures


def run(count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir) / "redis", fsync="everysec")
        server.start()
        try:
            store = Store(server.client(), Settings.from_env({"REDIS_URL": server.url}))
            return measure(store, count, server, Path(workdir))
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=50_000)
    figures = run(parser.parse_args(argv).records)
    write_figures("history", figures)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
