"""A short run of the benchmark, so it cannot rot: it must run and find every call correct."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.stack import run_module

pytestmark = pytest.mark.slow


def test_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = run_module("bench.run", "--smoke", "--out", str(out), timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(out.read_text())
    check = figures["correctness"]
    assert check["calls"] > 0
    assert check["events_acknowledged"] > check["calls"]
    assert (check["lost"], check["applied_twice"], check["calls_differing"]) == (0, 0, 0)
    assert check["calls_with_wrong_record_count"] == 0
    assert set(figures["targets"]) == {
        "applied_vs_empty_rq_jobs",
        "webhook_vs_bare_echo",
        "half_rate_webhook_p99_ms",
        "half_rate_apply_lag_p50_ms",
        "half_rate_apply_lag_p99_ms",
        "bytes_per_active_call",
        "flat_cost_drop",
        "metrics_on_vs_off_webhook",
        "metrics_on_vs_off_apply",
        "forwarding_on_vs_off_apply",
    }
    for phase in ("max_rate", "half_rate"):
        measured = figures[phase]
        # Every event the phase logged was applied and its lag counted, none twice.
        assert measured["exact_apply_lag_ms"]["count"] == measured["sent"] > 0
        assert 0 <= measured["exact_apply_lag_ms"]["p50"] <= measured["exact_apply_lag_ms"]["p99"]
        cpu = measured["cpu_ms_per_event"]
        assert set(cpu) == {"web", "workers", "redis", "load generator"}
        assert cpu["web"] > 0 and cpu["workers"] > 0
    cost = figures["metrics_cost"]
    assert cost["webhook"]["order"] == cost["apply"]["order"] == ["on", "off"]
    assert cost["scrape"]["latency_ms"]["count"] > 0 and cost["scrape"]["failures"] == 0
    assert "floor: empty RQ jobs" in run.stdout
    forwarding = figures["forwarding_cost"]
    assert forwarding["order"] == ["on", "off"]
    assert forwarding["forwarded"][0]["delivered_so_far"] > 0
