"""`/metrics` and `/readyz` on the real stack: gunicorn with 2 processes, RQ workers, Redis."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from rq import Worker

from callstate.jobs import WORKER_TTL_SECONDS
from tests.factories import body, ended, event
from tests.integration.stack import Stack, wait_until

MakeStack = Callable[..., Stack]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

BURST = [
    event("metrics-a", "ringing", 100),
    event("metrics-a", "answered", 200),
    event("metrics-a", "answered", 200),  # duplicate
    event("metrics-a", "ringing", 150),  # rejected: out_of_order
    event("metrics-b", "ringing", 100),
    ended("metrics-b", 300, "USER_END_CALL", 0),  # a record
]
INVALID = b'{"call_id": "metrics-c", '


def samples(text: str) -> Samples:
    """Every sample of the exposition by name and labels, parsed by prometheus_client itself."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in found.items() if n == name and wanted <= have)


def moved_by(before: Samples, after: Samples, name: str, *by: str) -> dict[tuple[str, ...], float]:
    """How far `name` moved between two scrapes, summed by the labels `by`, where it moved."""
    moved: defaultdict[tuple[str, ...], float] = defaultdict(float)
    for scrape, sign in ((after, 1), (before, -1)):
        for (found, labels), v in scrape.items():
            if found == name:
                moved[tuple(dict(labels)[label] for label in by)] += sign * v
    return {key: v for key, v in moved.items() if v}


class Client:
    """Requests to the stack, each on a new connection (so gunicorn spreads them over its
    processes), counted by route and status as `/metrics` should count them."""

    def __init__(self, stack: Stack) -> None:
        self.url = stack.web_url
        self.sent: Counter[tuple[str, str]] = Counter()

    def get(self, path: str, route: str) -> requests.Response:
        return self.count(route, requests.get(f"{self.url}{path}", timeout=10))

    def post(self, raw: bytes) -> requests.Response:
        response = requests.post(
            f"{self.url}/webhooks/stringee",
            data=raw,
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        return self.count("/webhooks/stringee", response)

    def count(self, route: str, response: requests.Response) -> requests.Response:
        self.sent[(route, str(response.status_code))] += 1
        return response

    def scrape(self) -> Samples:
        response = self.get("/metrics", "/metrics")
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return samples(response.text)


def served_by_process(metrics_dir: Path, route: str) -> list[float]:
    """Requests to `route` counted by each gunicorn process, from its own file."""
    counts = []
    for path in sorted(metrics_dir.glob("counter_*.db")):
        merged = MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
        found = {(s.name, frozenset(s.labels.items())): s.value for m in merged for s in m.samples}
        counts.append(total(found, "callstate_http_requests_total", endpoint=route))
    return counts


def test_a_known_burst_moves_every_counter_by_exactly_what_it_should(
    make_stack: MakeStack,
) -> None:
    stack = make_stack()
    metrics_dir = Path(stack.env["CALLSTATE_VAR_DIR"]) / "prometheus"
    metrics_dir.mkdir(parents=True)
    stale = metrics_dir / "counter_1.db"
    stale.write_bytes(b"left by an earlier run")
    stack.start_web(processes=2)
    assert not stale.exists()
    stack.start_workers(2)
    client = Client(stack)
    wait_until(lambda: client.get("/readyz", "/readyz").status_code == 200, 30, "ready")

    client.sent.clear()
    before = client.scrape()
    for payload in BURST:
        assert client.post(body(payload)).status_code == 200
    assert client.post(INVALID).status_code == 400
    logged = len(BURST)

    shards = Counter(str(stack.keys.shard_of(p["call_id"])) for p in BURST)

    def drained() -> Samples | None:
        found = client.scrape()
        applied = total(found, "callstate_applied_entries_total")
        done = applied - total(before, "callstate_applied_entries_total") == logged
        # A drain job counts its duration as it ends (once the shards it took are quiet), after
        # the commits that applied the burst; one job may have applied several shards.
        jobs = "callstate_drain_job_seconds_count"
        timed = total(found, jobs) - total(before, jobs) >= 1
        return found if done and timed and total(found, "callstate_backlog_entries") == 0 else None

    wait_until(drained, 30, "the burst to be applied")

    def both_processes_served() -> bool:
        assert client.get("/healthz", "/healthz").ok
        return sum(n > 0 for n in served_by_process(metrics_dir, "/healthz")) == 2

    # Until each process has answered some, so the scrape must add up two processes' files.
    wait_until(both_processes_served, 30, "both gunicorn processes to serve /healthz")
    after = client.scrape()
    client.sent[("/metrics", "200")] -= 1  # the last scrape is counted after its answer

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    for shard in map(str, range(8)):
        assert moved("callstate_log_entries_total", shard=shard) == shards[shard]
        assert moved("callstate_applied_entries_total", shard=shard) == shards[shard]
        assert value(after, "callstate_backlog_entries", shard=shard) == 0
        assert value(after, "callstate_backlog_oldest_seconds", shard=shard) == 0
    assert moved_by(before, after, "callstate_verdicts_total", "verdict", "reason") == {
        ("accepted", ""): 4,
        ("duplicate", ""): 1,
        ("rejected", "out_of_order"): 1,
    }
    assert moved("callstate_records_total") == 1
    assert moved("callstate_quarantined_total") == 1
    assert moved("callstate_quarantine_entries") == 1
    assert moved("callstate_sweeper_closed_calls_total") == 0
    assert moved("callstate_active_calls", status="answered") == 1
    assert moved("callstate_active_calls") == 1
    assert moved("callstate_drain_job_seconds_count") >= 1
    assert moved("callstate_apply_lag_seconds_count") == logged, "every applied event, once"
    for shard in map(str, range(8)):
        count = value(after, "callstate_drain_job_seconds_count", shard=shard)
        assert value(after, "callstate_drain_job_seconds_bucket", shard=shard, le="+Inf") == count
    assert value(after, "callstate_workers_live") == 2
    assert value(after, "callstate_redis_up") == 1

    counted = moved_by(before, after, "callstate_http_requests_total", "endpoint", "status")
    assert counted == {k: v for k, v in client.sent.items() if v}
    assert sum(served_by_process(metrics_dir, "/healthz")) == client.sent[("/healthz", "200")]
    latency = "callstate_http_request_duration_seconds_count"
    assert moved(latency, endpoint="/webhooks/stringee") == len(BURST) + 1


def test_readyz_names_the_workers_then_the_backlog_once_workers_stop(
    make_stack: MakeStack,
) -> None:
    stack = make_stack(CALLSTATE_READY_MAX_LAG_SECONDS="1")
    stack.start_web(processes=2)
    stack.start_workers(2)

    def readyz(status: int, failing: list[str]) -> dict[str, Any] | None:
        response = stack.get("/readyz")
        found: dict[str, Any] = response.json()
        return found if (response.status_code, found["failing"]) == (status, failing) else None

    def both_workers_ready() -> dict[str, Any] | None:
        found = readyz(200, [])
        return found if found and found["checks"]["workers"]["live"] == 2 else None

    ready = wait_until(both_workers_ready, 30, "both workers to be ready")
    assert ready["status"] == "ready"
    assert ready["checks"]["workers"] == {"ok": True, "live": 2}
    # A worker killed outright stays in RQ's registry until its key expires: 2 minutes at most.
    worker_keys = Worker.all_keys(connection=stack.redis.client())
    assert worker_keys and all(
        0 < stack.redis.client().ttl(key) <= WORKER_TTL_SECONDS + 60 for key in worker_keys
    )
    for name in [n for n in stack.processes if n.startswith("worker")]:
        stack.stop_process(name)
    unready = readyz(503, ["workers"])
    assert unready is not None and unready["status"] == "unready"
    assert unready["checks"]["workers"] == {"ok": False, "live": 0}

    assert stack.post(event("readyz-1", "ringing", 100)).status_code == 200
    stalled = wait_until(
        lambda: readyz(503, ["workers", "backlog"]),
        10,
        "the backlog to pass CALLSTATE_READY_MAX_LAG_SECONDS",
    )
    backlog = stalled["checks"]["backlog"]
    shard = str(stack.keys.shard_of("readyz-1"))
    assert backlog["ok"] is False and backlog["max_lag_seconds"] == 1
    assert backlog["by_shard"][shard] == backlog["oldest_seconds"] > 1
