"""`callstate doctor` and the start-up warning, against a real Redis server."""

from __future__ import annotations

from collections.abc import Callable

from tests.integration.stack import Stack, wait_until

MakeStack = Callable[..., Stack]


def test_doctor_passes_the_embedded_settings_and_names_what_is_off(make_stack: MakeStack) -> None:
    stack = make_stack()
    healthy = stack.cli("doctor")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.count("ok ") == 3

    redis = stack.redis.client()
    redis.config_set("appendfsync", "no")
    redis.config_set("maxmemory-policy", "allkeys-lru")
    unsafe = stack.cli("doctor")
    assert unsafe.returncode == 1
    problems = [line for line in unsafe.stdout.splitlines() if line.startswith("PROBLEM")]
    assert [line.split()[1] for line in problems] == ["appendfsync", "maxmemory-policy"]

    redis.config_set("appendfsync", "everysec")
    redis.config_set("maxmemory-policy", "noeviction")
    redis.acl_setuser("default", enabled=True, commands=["-info"])
    refused = stack.cli("doctor")
    assert refused.returncode == 1 and refused.stdout.count("unknown") == 2, refused.stdout
    redis.acl_setuser("default", enabled=True, commands=["+info"])
    redis.config_set("appendfsync", "no")
    redis.config_set("maxmemory-policy", "allkeys-lru")

    stack.start_workers(1)
    wait_until(
        lambda: "maxmemory-policy is allkeys-lru" in stack.logs(), 20, "the worker's warning"
    )
    assert "appendfsync is no" in stack.logs()
    stack.redis.stop()
    down = stack.cli("doctor")
    assert down.returncode == 2 and "cannot reach Redis" in down.stderr
