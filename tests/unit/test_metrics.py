"""`/metrics` through Flask's test client, on fakeredis: the pipeline's figures as Prometheus
families, the per-route HTTP figures, the read token, and CALLSTATE_METRICS=off."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import fakeredis
import pytest
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from redis import Redis
from rq import Worker

from callstate.config import Settings
from callstate.drain import Drainer
from callstate.figures import record_drain_seconds
from callstate.store import Store
from callstate.web import create_app
from tests.factories import body, event, known_burst

BURST = known_burst("m")
SHARDS = [str(shard) for shard in range(4)]
Families = dict[str, list[Sample]]


def scrape(client: FlaskClient, **headers: str) -> Families:
    """The families of a scrape, as prometheus_client's own parser reads them."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.data
    assert response.content_type == "text/plain; version=0.0.4; charset=utf-8"
    text = response.get_data(as_text=True)
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def summed(families: Families, sample: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The values of the samples named `sample`, added up by `labels` (all others summed over),
    leaving out zeros."""
    found: dict[tuple[str, ...], float] = {}
    for samples in families.values():
        for s in samples:
            if s.name == sample:
                key = tuple(s.labels[label] for label in labels)
                found[key] = found.get(key, 0.0) + s.value
    return {key: value for key, value in found.items() if value}


def one(families: Families, sample: str) -> float:
    return summed(families, sample).get((), 0.0)


def log_and_drain(store: Store, drainer: Drainer) -> dict[tuple[str, ...], float]:
    """Log the burst as the webhook would and drain every shard; entries logged per shard."""
    logged: dict[tuple[str, ...], float] = {}
    for payload in BURST:
        _, shard, _ = store.log.append_event(payload["call_id"], body(payload))
        logged[(str(shard),)] = logged.get((str(shard),), 0) + 1
    for shard in range(store.settings.shards):
        drainer.drain(shard)
    return logged


def test_a_known_burst_shows_in_every_pipeline_family(
    client: FlaskClient, store: Store, drainer: Drainer
) -> None:
    logged = log_and_drain(store, drainer)
    store.quarantine.add({"error": "invalid_json"})
    families = scrape(client)
    assert summed(families, "callstate_log_entries_total", "shard") == logged
    assert summed(families, "callstate_applied_entries_total", "shard") == logged
    assert summed(families, "callstate_verdicts_total", "verdict", "reason") == {
        ("accepted", ""): 5,
        ("duplicate", ""): 1,
        ("rejected", "out_of_order"): 1,
    }
    assert summed(families, "callstate_active_calls", "status") == {
        ("ringing",): 1,
        ("answered",): 1,
    }
    every_status = {s.labels["status"] for s in families["callstate_active_calls"]}
    assert every_status == {"created", "started", "ringing", "answered", "agentEnded"}
    assert one(families, "callstate_records_total") == 1
    assert one(families, "callstate_quarantined_total") == 1
    assert one(families, "callstate_quarantine_entries") == 1
    assert one(families, "callstate_sweeper_closed_calls_total") == 0
    assert summed(families, "callstate_backlog_entries", "shard") == {}
    assert {s.labels["shard"] for s in families["callstate_backlog_oldest_seconds"]} == set(SHARDS)
    assert one(families, "callstate_redis_up") == 1
    assert one(families, "callstate_workers_live") == 0


def test_the_backlog_shows_its_entries_and_age(client: FlaskClient, store: Store) -> None:
    _, shard, _ = store.log.append_event("m-a", body(BURST[0]))
    families = scrape(client)
    assert summed(families, "callstate_backlog_entries", "shard") == {(str(shard),): 1}
    ages = {s.labels["shard"]: s.value for s in families["callstate_backlog_oldest_seconds"]}
    assert ages.keys() == set(SHARDS) and 0 <= ages[str(shard)] < 5
    assert all(ages[other] == 0 for other in SHARDS if other != str(shard))


def test_calls_closed_by_the_sweeper_are_counted(
    client: FlaskClient, store: Store, drainer: Drainer
) -> None:
    _, shard, _ = store.log.append_event("m-s", body(event("m-s", "ringing", 100)))
    drainer.drain(shard)
    store.log.append_sweep("m-s", store.log.server_time_ms() + 1)
    drainer.drain(shard)
    families = scrape(client)
    assert one(families, "callstate_sweeper_closed_calls_total") == 1
    assert summed(families, "callstate_verdicts_total", "verdict", "reason")[("swept", "stale")]
    assert summed(families, "callstate_active_calls", "status") == {}


def test_drain_durations_are_a_histogram_per_shard(
    client: FlaskClient, store: Store, redis: Redis
) -> None:
    for seconds in (0.003, 0.04, 20.0):
        record_drain_seconds(redis, store.keys, 2, seconds)
    samples = scrape(client)["callstate_drain_job_seconds"]
    shard_2 = [s for s in samples if s.labels["shard"] == "2"]
    buckets = {s.labels["le"]: s.value for s in shard_2 if s.name.endswith("_bucket")}
    assert (buckets["0.0025"], buckets["0.005"], buckets["0.05"], buckets["10.0"]) == (0, 1, 2, 2)
    assert buckets["+Inf"] == 3
    totals = {s.name: s.value for s in shard_2 if not s.name.endswith("_bucket")}
    assert totals["callstate_drain_job_seconds_count"] == 3
    assert totals["callstate_drain_job_seconds_sum"] == pytest.approx(20.043)


def test_apply_lags_are_a_histogram_per_shard_in_the_stored_buckets(
    client: FlaskClient, store: Store, redis: Redis
) -> None:
    """Stored as ms buckets by the commits; exposed in seconds, each bucket's count exact."""
    key = store.keys.apply_lag(1)
    redis.hset(key, mapping={"2": 5, "5": 3, "25": 1, "30": 1, "inf": 1, "count": 11})
    redis.hset(key, "sum_ms", 5 * 2 + 3 * 5 + 25 + 30 + 100_000)
    samples = [s for s in scrape(client)["callstate_apply_lag_seconds"] if s.labels["shard"] == "1"]
    buckets = {s.labels["le"]: s.value for s in samples if s.name.endswith("_bucket")}
    assert (buckets["0.002"], buckets["0.005"], buckets["0.025"], buckets["0.05"]) == (5, 8, 9, 10)
    assert (buckets["60.0"], buckets["+Inf"]) == (10, 11)
    totals = {s.name: s.value for s in samples if not s.name.endswith("_bucket")}
    assert totals["callstate_apply_lag_seconds_count"] == 11
    assert totals["callstate_apply_lag_seconds_sum"] == pytest.approx(100.08)


def test_live_workers_are_counted(client: FlaskClient, redis: Redis, settings: Settings) -> None:
    own = fakeredis.FakeRedis(server=redis.connection_pool.connection_kwargs["server"])
    Worker([settings.queue_name], connection=own).register_birth()  # type: ignore[no-untyped-call]
    assert one(scrape(client), "callstate_workers_live") == 1


def test_requests_are_counted_by_route_never_by_raw_path(client: FlaskClient) -> None:
    for call_id in ("call-1", "call-2", "call-3"):
        assert client.get(f"/calls/{call_id}").status_code == 404
    assert client.get("/healthz").status_code == 200
    assert client.get("/no/such/page/42").status_code == 404
    refused = client.post("/webhooks/stringee", data=b"{", content_type="application/json")
    assert refused.status_code == 400
    families = scrape(client)
    assert summed(families, "callstate_http_requests_total", "endpoint", "status") == {
        ("/calls/<call_id>", "404"): 3,
        ("/healthz", "200"): 1,
        ("unmatched", "404"): 1,
        ("/webhooks/stringee", "400"): 1,
    }
    latency = summed(families, "callstate_http_request_duration_seconds_count", "endpoint")
    assert latency == {
        ("/calls/<call_id>",): 3,
        ("/healthz",): 1,
        ("unmatched",): 1,
        ("/webhooks/stringee",): 1,
    }


def test_names_follow_prometheus_conventions(client: FlaskClient) -> None:
    text = client.get("/metrics").get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("callstate_")
        if family.type == "counter":
            assert {s.name for s in family.samples} <= {
                f"{family.name}_total",
                f"{family.name}_created",
            }
        if family.type == "histogram":
            assert family.name.endswith("_seconds")


def test_metrics_need_the_read_token_when_one_is_set(settings: Settings, redis: Redis) -> None:
    client = create_app(dataclasses.replace(settings, api_token="tok"), redis).test_client()
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert refused.get_json()["error"] == "unauthorized"
    assert one(scrape(client, Authorization="Bearer tok"), "callstate_redis_up") == 1


def test_with_metrics_off_there_is_no_endpoint_and_no_instrumentation(
    settings: Settings, redis: Redis
) -> None:
    app = create_app(dataclasses.replace(settings, metrics=False), redis)
    response = app.test_client().get("/metrics")
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"
    assert "callstate.metrics" not in app.extensions
    # No app-wide hooks (key None): the only request hooks left are the blueprints' own.
    assert None not in app.before_request_funcs and None not in app.after_request_funcs


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_with_redis_down_the_scrape_still_answers_with_the_http_figures(
    settings: Settings,
) -> None:
    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    client = create_app(down).test_client()
    unstored = client.post(
        "/webhooks/stringee", data=body(BURST[0]), content_type="application/json"
    )
    assert unstored.status_code == 503
    families = scrape(client)
    assert one(families, "callstate_redis_up") == 0
    assert "callstate_log_entries" not in families
    assert summed(families, "callstate_http_requests_total", "endpoint", "status") == {
        ("/webhooks/stringee", "503"): 1
    }


def test_the_settings_switch_metrics_off_and_name_the_directory(tmp_path: Path) -> None:
    defaults = Settings.from_env({"CALLSTATE_VAR_DIR": str(tmp_path)})
    assert defaults.metrics and defaults.ready_max_lag_seconds == 30
    assert defaults.multiproc_dir is None and defaults.metrics_dir == tmp_path / "prometheus"
    given = Settings.from_env(
        {
            "CALLSTATE_METRICS": "off",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "shared"),
            "CALLSTATE_READY_MAX_LAG_SECONDS": "5",
        }
    )
    assert not given.metrics and given.ready_max_lag_seconds == 5
    assert given.metrics_dir == tmp_path / "shared"
    with pytest.raises(ValueError, match="CALLSTATE_METRICS"):
        Settings.from_env({"CALLSTATE_METRICS": "maybe"})
    with pytest.raises(ValueError, match="CALLSTATE_READY_MAX_LAG_SECONDS"):
        Settings.from_env({"CALLSTATE_READY_MAX_LAG_SECONDS": "0"})
