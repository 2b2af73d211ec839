"""Moving a deployment to another Redis with another shard count, as an operator does it: stop
the service, `callstate export-store`, `callstate import-store` into an empty server under
the new CALLSTATE_SHARDS, `rebuild --check`, start the service there, and it goes on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.factories import ended, event
from tests.integration.stack import RedisServer, Server, Stack, wait_until

MakeStack = Callable[..., Stack]
CALLS = [f"move-{n}" for n in range(12)]


def applied(stack: Stack, call_id: str, status: str) -> bool:
    found = stack.get(f"/calls/{call_id}")
    return found.status_code == 200 and found.json()["status"] == status


def lookups(stack: Stack) -> dict[str, Any]:
    paths = [f"/calls/{c}" for c in CALLS] + [f"/calls/{c}/record" for c in CALLS]
    paths += ["/calls?active=true", "/calls?active=true&number=84909985668", "/records?since=0"]
    return {path: stack.get(path).json() for path in paths}


def test_a_store_moves_to_another_server_and_shard_count(
    make_stack: MakeStack, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "target-redis")
    server.start()
    try:
        move_and_go_on(make_stack, tmp_path, server, {"CALLSTATE_SHARDS": "6"})
    finally:
        server.stop()


def move_and_go_on(
    make_stack: MakeStack, tmp_path: Path, server: Server, target_env: dict[str, str]
) -> None:
    """The move, from a 4-shard store on `make_stack`'s server to `server` (started, empty) under
    `target_env`, then checks there and new events applied on top."""
    source = make_stack(CALLSTATE_SHARDS="4")
    source.start_web(processes=1)
    source.start_workers(1)
    for n, call_id in enumerate(CALLS):
        assert source.post(event(call_id, "ringing", 100)).status_code == 200
        assert source.post(event(call_id, "answered", 200)).status_code == 200
        if n % 3 == 0:
            assert source.post(ended(call_id, 300, "USER_END_CALL", 10)).status_code == 200
    expected = {c: "ended" if n % 3 == 0 else "answered" for n, c in enumerate(CALLS)}
    wait_until(
        lambda: all(applied(source, c, status) for c, status in expected.items()),
        20,
        "every event applied",
    )
    refused = source.cli("export-store", "--output", str(tmp_path / "refused.jsonl"))
    assert refused.returncode == 1 and "stop the workers" in refused.stderr
    before = lookups(source)
    source.stop_process("web")
    source.stop_process("worker-0")

    exported = tmp_path / "store.jsonl"
    done = source.cli("export-store", "--output", str(exported))
    assert done.returncode == 0, done.stderr

    target = Stack(server, tmp_path / "target", target_env)
    (tmp_path / "target").mkdir()
    try:
        imported = target.cli("import-store", "--input", str(exported))
        assert imported.returncode == 0, imported.stderr
        assert f"into {target_env['CALLSTATE_SHARDS']} shards" in imported.stderr
        again = target.cli("import-store", "--input", str(exported))
        assert again.returncode == 1 and "not empty" in again.stderr
        checked = target.cli("rebuild", "--check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f"{len(CALLS)} calls compared, 0 differ" in checked.stdout

        target.start_web(processes=1)
        target.start_workers(1)
        assert lookups(target) == before
        assert target.post(ended(CALLS[1], 400, "USER_END_CALL", 20)).status_code == 200
        assert target.post(event(CALLS[2], "answered", 200)).status_code == 200  # again
        wait_until(lambda: applied(target, CALLS[1], "ended"), 20, "the new event applied")
        wait_until(
            lambda: target.get(f"/calls/{CALLS[2]}").json()["counts"]["duplicate"] == 1,
            20,
            "the delivery again applied as a duplicate",
        )
        record = target.get(f"/calls/{CALLS[1]}/record").json()
        assert record["revision"] == 1 and record["disposition"] == "answered"
        after = target.cli("rebuild", "--check")
        assert after.returncode == 0, after.stdout + after.stderr
    finally:
        target.stop()
        print(target.logs())
