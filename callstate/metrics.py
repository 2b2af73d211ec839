"""`GET /metrics` for Prometheus: each web process's HTTP figures, added up across gunicorn's
processes by prometheus_client's multiprocess mode, and the pipeline's figures, read from Redis
at scrape time so that every web process reports the same truth."""

from __future__ import annotations

import time
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString
from redis.exceptions import RedisError
from rq import Queue

from callstate.figures import Figures, Forwarding, read_deliveries, read_figures
from callstate.health import live_workers
from callstate.http import Services, require_read_token
from callstate.machine import FINAL, TABLE
from callstate.store import Store

ACTIVE_STATUSES = tuple(status for status in TABLE if status != FINAL)
# The label of a request that matched no route: its raw path would let any client add series.
UNMATCHED = "unmatched"
REDIS_UP = "Whether Redis answered this scrape (the pipeline's figures are missing when not)."
QUEUE_UP = (
    "Whether the Redis of RQ's queues answered this scrape (the data Redis unless "
    "CALLSTATE_QUEUE_URL is set); the workers' and the deliveries' figures are missing when not."
)

metrics = Blueprint("metrics", __name__)
metrics.before_request(require_read_token)


class Instruments:
    """This process's request counter and latency histogram, and the registry `/metrics` reads:
    under gunicorn (PROMETHEUS_MULTIPROC_DIR set) every process's figures, from its directory."""

    def __init__(self, svc: Services) -> None:
        shared = svc.settings.multiproc_dir
        self.registry = CollectorRegistry()
        if shared is not None:
            MultiProcessCollector(self.registry, path=str(shared))  # type: ignore[no-untyped-call]
        own = self.registry if shared is None else None
        self.requests = Counter(
            "callstate_http_requests_total",
            "HTTP requests answered, by route and status code.",
            ["endpoint", "status"],
            registry=own,
        )
        self.latency = Histogram(
            "callstate_http_request_duration_seconds",
            "Time from a request's arrival in Flask to its answer, by route.",
            ["endpoint"],
            registry=own,
        )
        self.registry.register(PipelineCollector(svc.store, svc.queue))
        # Each route's and status's labelled series, found once: `labels()` checks and locks.
        self._series: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def start_timer(self) -> None:
        g.metrics_started = time.perf_counter()

    def count_request(self, response: Response) -> Response:
        rule = request.url_rule
        key = (UNMATCHED if rule is None else rule.rule, response.status_code)
        series = self._series.get(key) or self._add_series(*key)
        series[0].inc()
        series[1].observe(time.perf_counter() - g.metrics_started)
        return response

    def _add_series(self, endpoint: str, status: int) -> tuple[Counter, Histogram]:
        series = (self.requests.labels(endpoint, str(status)), self.latency.labels(endpoint))
        self._series[(endpoint, status)] = series
        return series


def install(app: Flask) -> None:
    """With CALLSTATE_METRICS on (the default), count and time every request and serve
    `/metrics`; with it off, neither (`/metrics` answers 404)."""
    svc: Services = app.extensions["callstate"]
    if not svc.settings.metrics:
        return
    instruments = app.extensions["callstate.metrics"] = Instruments(svc)
    app.before_request(instruments.start_timer)
    app.after_request(instruments.count_request)
    app.register_blueprint(metrics)


@metrics.get("/metrics")
def scrape() -> Response:
    return Response(generate_latest(_instruments().registry), content_type=CONTENT_TYPE_PLAIN_0_0_4)


def _instruments() -> Instruments:
    found: Instruments = current_app.extensions["callstate.metrics"]
    return found


class PipelineCollector:
    """The pipeline's figures, read from Redis on every scrape (a handful of round trips,
    whatever the number of shards). With Redis down, only `callstate_redis_up 0`."""

    def __init__(self, store: Store, queue: Queue) -> None:
        self.store = store
        self.queue = queue
        settings, connection = store.settings, queue.connection
        # With forwarding on, its two workers too: without a retrier, failed deliveries are
        # never tried again and their calls' later revisions wait behind them, silently.
        self.record_queues = (
            {
                "forward": Queue(settings.record_queue_name, connection=connection),
                "retries": Queue(settings.record_retry_queue_name, connection=connection),
            }
            if settings.forwarding
            else {}
        )

    def collect(self) -> Iterator[Metric]:
        """The data Redis' figures, then the queue's Redis' (the workers, the delivery jobs):
        with the queue's own server down, the backlog still shows it pile up."""
        try:
            figures = read_figures(self.store, with_deliveries=False)
        except RedisError:
            yield GaugeMetricFamily("callstate_redis_up", REDIS_UP, value=0)
            return
        yield GaugeMetricFamily("callstate_redis_up", REDIS_UP, value=1)
        yield from _shard_families(figures)
        yield from _call_families(figures)
        # On the data Redis, and what piles up while the queue's server (the forwarder) is down.
        yield GaugeMetricFamily(
            "callstate_record_outbox_entries",
            "Record revisions committed and not yet handed to the forwarder.",
            figures.forwarding.outbox,
        )
        try:
            deliveries = sum(read_deliveries(self.store), Forwarding())
            workers = live_workers(self.queue)
            record_workers = {role: live_workers(q) for role, q in self.record_queues.items()}
        except RedisError:
            yield GaugeMetricFamily("callstate_queue_up", QUEUE_UP, value=0)
            return
        yield GaugeMetricFamily("callstate_queue_up", QUEUE_UP, value=1)
        yield GaugeMetricFamily(
            "callstate_workers_live", "RQ workers of the queue with a live heartbeat.", workers
        )
        yield from _forwarding_families(deliveries)
        if record_workers:
            yield _record_workers_family(record_workers)


def _record_workers_family(live: dict[str, int]) -> Metric:
    family = GaugeMetricFamily(
        "callstate_record_workers_live",
        "Record forwarding's RQ workers with a live heartbeat: `forward` (the Procfile's "
        "forwarder) and `retries` (its retrier).",
        labels=["queue"],
    )
    for role, count in live.items():
        family.add_metric([role], count)
    return family


def _shard_families(figures: Figures) -> Iterator[Metric]:
    logged = CounterMetricFamily(
        "callstate_log_entries_total",
        "Entries appended to the shard's event log (events and sweeper requests).",
        labels=["shard"],
    )
    applied = CounterMetricFamily(
        "callstate_applied_entries_total", "Log entries applied by the drainers.", labels=["shard"]
    )
    verdicts = CounterMetricFamily(
        "callstate_verdicts_total",
        "Applied log entries by verdict and reason (reason empty when there is none).",
        labels=["shard", "verdict", "reason"],
    )
    entries = GaugeMetricFamily(
        "callstate_backlog_entries", "Log entries not applied yet.", labels=["shard"]
    )
    oldest = GaugeMetricFamily(
        "callstate_backlog_oldest_seconds",
        "Age of the shard's oldest unapplied log entry (0 when none waits).",
        labels=["shard"],
    )
    drains = HistogramMetricFamily(
        "callstate_drain_job_seconds", "Duration of the shard's drain jobs.", labels=["shard"]
    )
    lags = HistogramMetricFamily(
        "callstate_apply_lag_seconds",
        "Time from an event's append to the commit that applied it, on Redis' clock.",
        labels=["shard"],
    )
    for shard in figures.shards:
        label = str(shard.shard)
        logged.add_metric([label], shard.logged)
        applied.add_metric([label], shard.applied)
        for name, count in sorted(shard.verdicts.items()):
            verdict, _, reason = name.partition(":")
            verdicts.add_metric([label, verdict, reason], count)
        entries.add_metric([label], shard.backlog.entries)
        oldest.add_metric([label], shard.backlog.oldest_seconds or 0.0)
        histogram = shard.drain_seconds
        buckets = [(_bound(bound), count) for bound, count in histogram.buckets]
        drains.add_metric([label], buckets, histogram.sum)
        lag = shard.apply_lag
        lags.add_metric([label], [(_bound(b), n) for b, n in lag.buckets], lag.sum)
    yield from (logged, applied, verdicts, entries, oldest, drains, lags)


def _bound(bound: float) -> str:
    """A bucket's `le` as prometheus_client writes its own ("0.005", "+Inf")."""
    written: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return written


def _call_families(figures: Figures) -> Iterator[Metric]:
    active = GaugeMetricFamily(
        "callstate_active_calls",
        "Calls not ended, by status (their sum is every active call).",
        labels=["status"],
    )
    by_status = dict.fromkeys(ACTIVE_STATUSES, 0) | figures.active
    for status, count in by_status.items():
        active.add_metric([status], count)
    yield active
    yield CounterMetricFamily(
        "callstate_records_total", "Final record revisions published.", figures.records
    )
    yield CounterMetricFamily(
        "callstate_sweeper_closed_calls_total",
        "Silent calls closed by the sweeper.",
        figures.verdicts.get("swept:stale", 0),
    )
    yield CounterMetricFamily(
        "callstate_quarantined_total",
        "Refused deliveries and unprocessable log entries put in the quarantine.",
        figures.quarantined,
    )
    yield GaugeMetricFamily(
        "callstate_quarantine_entries", "Entries the quarantine holds.", figures.quarantine_size
    )


def _forwarding_families(forwarding: Forwarding) -> Iterator[Metric]:
    """Record deliveries, over every shard and receiver (all zeros while forwarding is off)."""
    yield CounterMetricFamily(
        "callstate_records_forwarded",
        "Record revisions delivered (answered 2xx), counted once per receiver.",
        forwarding.delivered,
    )
    yield CounterMetricFamily(
        "callstate_record_delivery_failures",
        "Failed attempts to deliver a record revision (another answer, a timeout, no connection).",
        forwarding.failed,
    )
    yield CounterMetricFamily(
        "callstate_records_dead_lettered",
        "Deliveries given up after the whole retry schedule, put in the dead-letter lists.",
        forwarding.dead_lettered,
    )
    yield GaugeMetricFamily(
        "callstate_record_dead_letters",
        "Deliveries in the dead-letter lists (`callstate records redeliver` sends them again).",
        forwarding.dead_letters,
    )
    yield GaugeMetricFamily(
        "callstate_record_deliveries_retrying",
        "Deliveries waiting in RQ jobs: retrying, or queued behind their call's earlier revision.",
        forwarding.retrying,
    )
