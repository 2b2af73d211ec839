"""Upgrading a deployment whose store the release before hash tags wrote, as an operator would:
the new web and workers refuse it, `callstate migrate-keys` moves it, `rebuild --check` finds
every call as its log says, and the pipeline goes on from where it was."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

from tests.factories import event, load_old_store
from tests.integration.stack import BIN, RedisServer, Stack, free_port, wait_until

MakeStack = Callable[..., Stack]
CENTURY_SECONDS = 100 * 365 * 86400


def exits_saying(process: subprocess.Popen[bytes], log: str, stack: Stack) -> bool:
    return process.poll() is not None and "migrate-keys" in (stack.workdir / log).read_text()


def test_an_old_store_is_refused_then_migrated_and_the_pipeline_goes_on(
    make_stack: MakeStack, redis_server: RedisServer
) -> None:
    load_old_store(redis_server.client())
    # The fixture's calls were last heard on 2026-11-29: a sweep or a snapshot step must not
    # close or retire them as time passes, or the test would depend on the day it runs.
    stack = make_stack(
        CALLSTATE_SHARDS="4",
        CALLSTATE_STALE_AFTER_SECONDS=str(CENTURY_SECONDS),
        CALLSTATE_RETENTION_SECONDS=str(CENTURY_SECONDS),
    )
    port = free_port()
    web = stack.spawn("old-web", [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "app:app"])
    worker = stack.spawn("old-worker", [sys.executable, "-m", "workers.events"])
    wait_until(lambda: exits_saying(web, "old-web.log", stack), 30, "the web to refuse")
    wait_until(lambda: exits_saying(worker, "old-worker.log", stack), 30, "the worker to refuse")
    assert worker.returncode != 0 and web.returncode != 0
    refused = stack.cli("stats")
    assert refused.returncode == 2 and "migrate-keys" in refused.stderr

    moved = stack.cli("migrate-keys")
    assert moved.returncode == 0, moved.stderr
    assert "split" in moved.stdout
    checked = stack.cli("rebuild", "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "12 calls compared, 0 differ" in checked.stdout

    stack.start_web()
    stack.start_workers(1)
    stack.start_scheduler()  # the wake flags of the old store name no queued job: maintenance
    wait_until(lambda: stack.get("/calls/old-2").json()["status"] == "ended", 30, "the backlog")
    assert stack.post(event("old-0", "answered", 3000)).status_code == 200
    wait_until(lambda: stack.get("/calls/old-0").json()["status"] == "answered", 20, "new event")
    old_0 = stack.get("/calls/old-0").json()
    assert old_0["counts"]["accepted"] == 2
    active = stack.get("/calls?active=true").json()
    assert "old-0" in [call["call_id"] for call in active["calls"]]
    records = stack.cli("records", "--json")
    assert records.returncode == 0, records.stderr
    assert "old-2" in {item["call_id"] for item in json.loads(records.stdout)}
    again = stack.cli("rebuild", "--check")
    assert again.returncode == 0, again.stdout
