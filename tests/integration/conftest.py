"""Integration fixtures: a fresh Redis server and process stack per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.ha import ClusterSet, SentinelSet
from tests.integration.stack import RedisServer, Stack
from tests.record_contract import assert_stream_fits


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server for the test; the records published to it must fit the record's schema
    (read before it stops, unless the test stopped it itself)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    try:
        if server.running():
            assert_stream_fits(server.client())
    finally:
        server.stop()


@pytest.fixture
def queue_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A second Redis server, for RQ's queues (CALLSTATE_QUEUE_URL)."""
    server = RedisServer(tmp_path / "queue")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_stack(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Build the stack with extra environment; its logs are printed (shown if the test fails)."""
    stacks: list[Stack] = []

    def build(**env: str) -> Stack:
        stack = Stack(redis_server, tmp_path, env)
        stacks.append(stack)
        return stack

    yield build
    for stack in stacks:
        stack.stop()
        print(stack.logs())


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    """A primary, two replicas and three sentinels watching it, stopped after the test."""
    ha = SentinelSet(tmp_path / "ha")
    try:
        ha.start()
        yield ha
    finally:
        ha.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSet]:
    """Three primaries with a replica each, and a Redis server for RQ's queues."""
    nodes = ClusterSet(tmp_path / "cluster", RedisServer(tmp_path / "queue"))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def make_cluster_stack(cluster: ClusterSet, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """`make_stack` on the cluster: its logs are printed, and none may hold a CROSSSLOT error."""
    stacks: list[Stack] = []

    def build(**env: str) -> Stack:
        stack = Stack(cluster, tmp_path, {**cluster.env, "CALLSTATE_SHARDS": "16", **env})
        stacks.append(stack)
        return stack

    yield build
    for stack in stacks:
        stack.stop()
        logs = stack.logs()
        print(logs)
        assert "CROSSSLOT" not in logs and "CrossSlot" not in logs
