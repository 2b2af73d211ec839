"""CALLSTATE_REDIS_CLUSTER_NODES: the settings a Redis Cluster for the data takes, and those it
refuses (the cluster's own behaviour is tested with real nodes in tests/integration)."""

from __future__ import annotations

import pytest

from callstate import cli
from callstate.config import Settings

NODES = "127.0.0.1:7000,[::1]:7001,redis-2.internal:7002"
QUEUE = "redis://127.0.0.1:6400/0"


def test_the_cluster_nodes_and_the_queues_server_are_taken() -> None:
    found = Settings.from_env(
        {"CALLSTATE_REDIS_CLUSTER_NODES": NODES, "CALLSTATE_QUEUE_URL": QUEUE}
    )
    assert found.cluster_nodes == ("127.0.0.1:7000", "[::1]:7001", "redis-2.internal:7002")
    assert found.queue_url == QUEUE
    assert not found.embedded_redis, "a cluster is run by its operator, not by `make run`"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "CALLSTATE_QUEUE_URL too"),
        ({"CALLSTATE_QUEUE_URL": QUEUE, "REDIS_URL": QUEUE}, "one of REDIS_URL"),
        (
            {
                "CALLSTATE_QUEUE_URL": QUEUE,
                "REDIS_SENTINELS": "127.0.0.1:26379",
                "REDIS_SENTINEL_MASTER": "cs",
            },
            "one of REDIS_URL",
        ),
        ({"CALLSTATE_QUEUE_URL": QUEUE, "CALLSTATE_REDIS_CLUSTER_NODES": "127.0.0.1"}, "host:port"),
        (
            {"CALLSTATE_QUEUE_URL": QUEUE, "CALLSTATE_REDIS_CLUSTER_NODES": "h:70000"},
            "host:port",
        ),
    ],
)
def test_settings_refuse_a_cluster_they_cannot_use(env: dict[str, str], message: str) -> None:
    """RQ cannot run on a cluster (its commands span hash slots), so the queues need a server of
    their own; and the data has one home, not two."""
    with pytest.raises(ValueError, match=message):
        Settings.from_env({"CALLSTATE_REDIS_CLUSTER_NODES": NODES, **env})


def test_the_cli_says_the_cluster_cannot_be_reached(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """redis-py's cluster client reads the slot map when it is made: with no node answering,
    the CLI exits 2 naming the cluster, not with a traceback."""
    monkeypatch.setenv("CALLSTATE_REDIS_CLUSTER_NODES", "127.0.0.1:1")
    monkeypatch.setenv("CALLSTATE_QUEUE_URL", QUEUE)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert cli.main(["stats"]) == cli.UNAVAILABLE
    assert "cannot reach Redis at the cluster of 127.0.0.1:1" in capsys.readouterr().err
