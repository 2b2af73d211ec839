"""The data side on a Redis Cluster (CALLSTATE_REDIS_CLUSTER_NODES) with real processes: three
primaries with a replica each, made by `redis-cli --cluster create`; RQ on a server of its own.
The acceptance runs there unchanged, and a primary killed under load loses no acknowledged
event (CALLSTATE_REPLICA_ACKS=1)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.factories import scenario
from tests.integration import test_pipeline, test_real_payloads
from tests.integration.ha import ClusterSet
from tests.integration.stack import Stack, wait_until
from tests.integration.test_reliability import (
    all_ended,
    assert_applied_exactly_once_in_order,
    post_interleaved,
    traffic,
)
from tests.integration.test_sentinel import (
    Poster,
    assert_each_applied_once_without_a_restart,
)
from tests.integration.test_transfer import move_and_go_on

pytestmark = pytest.mark.ha
MakeStack = Callable[..., Stack]
CALLS = 90


def test_the_acceptance_runs_unchanged_on_a_cluster(
    make_cluster_stack: MakeStack, cluster: ClusterSet
) -> None:
    """The pipeline's own acceptance tests and the corpus of real bodies (refusals quarantined),
    then interleaved traffic applied exactly once and in order, with the shards spread over
    every primary; the operator's commands work there."""
    test_pipeline.test_documented_events_become_state_and_a_record(make_cluster_stack)
    test_pipeline.test_call_center_call_with_late_duplicate_and_recording(make_cluster_stack)
    cluster.client().flushall()  # the corpus holds the documented example's call again
    real = make_cluster_stack()
    real.start_web()
    real.start_workers(2)
    test_real_payloads.test_every_real_body_gets_its_documented_verdict_and_record(real)
    cluster.client().flushall()  # the checks below count every record stored

    stack = make_cluster_stack()
    stack.start_web()
    stack.start_workers(2)
    calls = traffic(40, "cl")
    acked = post_interleaved(stack, calls, threads=4)
    wait_until(lambda: all_ended(stack, sorted(calls)), 60, "every call to end")
    assert_applied_exactly_once_in_order(stack, calls, acked)

    holding = [primary.client().dbsize() for primary in cluster.primaries()]
    assert len(holding) == 3 and all(holding), f"keys per primary: {holding}"
    check = stack.cli("rebuild", "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "0 differ" in check.stdout
    stats = stack.cli("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert figures["applied"] == figures["logged"] == sum(len(e) for e in calls.values())
    doctor = stack.cli("doctor")
    assert doctor.returncode == 0, doctor.stdout
    rebuilt = stack.cli("rebuild")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    page = stack.get("/calls?active=true&limit=5").json()
    assert page["total"] == 0
    ready = stack.get("/readyz")
    assert ready.status_code == 200, ready.text


def test_a_primary_killed_under_load_loses_no_acknowledged_event(
    make_cluster_stack: MakeStack, cluster: ClusterSet
) -> None:
    """A primary SIGKILLed while three posters deliver: its shards' events get 503 until the
    cluster promotes its replica and that one has a replica again, then 200 without any of the
    service's processes restarted; every call is applied exactly once, its events each
    accepted."""
    stack = make_cluster_stack(
        CALLSTATE_REPLICA_ACKS="1",
        CALLSTATE_DRAIN_LOCK_SECONDS="5",
        CALLSTATE_MAINTENANCE_INTERVAL_SECONDS="1",
    )
    stack.start_workers(2)
    stack.start_scheduler()
    stack.start_web(2)
    calls = {f"cl-{n}": scenario(f"cl-{n}", "busy", 1_000 * n) for n in range(CALLS)}
    poster = Poster(stack)
    poster.start(list(calls.values()))
    wait_until(lambda: poster.acknowledged >= CALLS, 60, "a third of the events")
    victim = cluster.primaries()[0]
    victim.kill()
    wait_until(lambda: len(cluster.primaries()) == 3, 30, "the replica's promotion")
    # The promoted replica has none of its own: its shards' events wait for the old primary,
    # restarted, to rejoin as its replica (Redis Cluster makes it one).
    victim.start()
    wait_until(cluster.healthy, 60, "the restarted node to replicate")
    poster.join()
    assert poster.acknowledged == 3 * CALLS

    assert victim not in cluster.primaries()
    assert poster.refused, "no delivery was refused: the switch went unseen"
    assert set(poster.refused) <= {"unavailable", "not_replicated"}, poster.refused

    assert_each_applied_once_without_a_restart(stack, list(calls))


def test_a_store_moves_from_one_redis_to_the_cluster(
    make_stack: MakeStack, cluster: ClusterSet, tmp_path: Path
) -> None:
    """As an operator moves a deployment onto a cluster: stop it, `export-store`, `import-store`
    into the empty cluster under more shards, `rebuild --check`, start there, go on."""
    move_and_go_on(make_stack, tmp_path, cluster, {**cluster.env, "CALLSTATE_SHARDS": "16"})


def test_doctor_judges_every_node_and_names_one_that_does_not_answer(
    make_cluster_stack: MakeStack, cluster: ClusterSet
) -> None:
    """Every node's settings are judged, replicas too (one promoted keeps its own); a node down
    is a finding of its own, not a failed check of them all."""
    stack = make_cluster_stack()
    assert stack.cli("doctor").returncode == 0
    replica = next(node for node in cluster.nodes if node not in cluster.primaries())
    replica.client().config_set("appendfsync", "no")
    unsafe = stack.cli("doctor")
    assert unsafe.returncode == 1, unsafe.stdout
    assert "PROBLEM  appendfsync = always, no" in unsafe.stdout
    replica.kill()
    down = stack.cli("doctor", "--json")
    assert down.returncode == 1, down.stdout + down.stderr
    findings = {item["setting"]: item for item in json.loads(down.stdout)["findings"]}
    assert findings["appendfsync"]["ok"], "the node that answered wrongly is the one down"
    answering = findings["nodes answering"]
    assert not answering["ok"] and f"127.0.0.1:{replica.port} not" in answering["found"]
