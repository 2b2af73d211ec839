"""Integration fixtures: a fresh Redis server and process stack per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.stack import RedisServer, Stack


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
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
