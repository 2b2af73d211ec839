"""A CI-sized run of the fault suite (`make faults` runs the full one): it must find nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.faults import FAULTS
from tests.integration.stack import run_module

pytestmark = pytest.mark.slow


def test_fault_suite_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    run = run_module("bench.faults", "--quick", "--out", str(out), timeout=280)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert [phase["fault"] for phase in figures["faults"]] == list(FAULTS)
    for phase in figures["faults"]:
        assert phase["acknowledged"] > 0
        assert (phase["lost"], phase["applied_twice"], phase["calls_differing"]) == (0, 0, 0)
        assert phase["quarantined"] == 0 and phase["rebuild_check_clean"]
    assert figures["faults"][2]["refused_deliveries"] > 0, "Redis was down: some 503s expected"
    soak = figures["soak"]
    assert soak["acknowledged"] > 0 and soak["lost"] == 0
    assert max(minute["drain_jobs_per_shard_max"] for minute in soak["minutes"]) <= 1
