"""What the processes log, read from their real output: with LOG_FORMAT=json, only JSON objects,
the ids as fields, no phone number, and no per-job line from RQ."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.factories import body, ended, event
from tests.integration.stack import Stack, wait_until

MakeStack = Callable[..., Stack]
NUMBERS = ("84899199866", "84909985668")


def test_json_logs_name_the_ids_and_never_a_phone_number(make_stack: MakeStack) -> None:
    stack = make_stack(
        LOG_FORMAT="json",
        CALLSTATE_ACCESS_LOG="on",
        CALLSTATE_MAINTENANCE_INTERVAL_SECONDS="1",
        CALLSTATE_STALE_AFTER_SECONDS="1",
    )
    stack.start_web(2)
    stack.start_workers(1)
    stack.start_scheduler()
    for status, ts in (("ringing", 1), ("answered", 2)):
        assert stack.post(event("logged-1", status, ts)).ok
    assert stack.post(ended("logged-1", 3, "USER_END_CALL", 8)).ok
    assert stack.post(event("silent-1", "ringing", 1)).ok  # closed by the sweeper: maintenance
    assert stack.post_raw(body(event("bad-1", "ringing", 1, duration=-1))).status_code == 422
    assert stack.get(f"/calls?active=true&number={NUMBERS[0]}").ok
    redis = stack.redis.client()
    shard = stack.keys.shard_of("poison-1")
    raw_id = redis.xadd(stack.keys.log(shard), {"call_id": "poison-1", "event": b"\x01junk"})
    poison_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id

    wait_until(lambda: stack.get("/calls/logged-1/record").ok, 30, "the call's record")
    wait_until(lambda: stack.get("/calls/silent-1/record").ok, 30, "the sweeper's record")
    assert stack.get("/calls/silent-1/record").json()["closed_by"] == "sweeper"
    wait_until(lambda: set_aside(stack, poison_id), 30, "the poison entry to be set aside")
    stack.stop()

    lines = {
        name: [
            json.loads(line) for line in (stack.workdir / f"{name}.log").read_text().splitlines()
        ]
        for name in ("web", "worker-0", "scheduler")
    }
    everything = [line for found in lines.values() for line in found]
    assert all(isinstance(line, dict) for line in everything)
    assert not [line for line in everything if any(n in json.dumps(line) for n in NUMBERS)]
    assert {line["level"] for line in everything} <= {"INFO", "WARNING", "ERROR"}

    [error] = [line for line in lines["worker-0"] if line["level"] == "ERROR"]
    assert (error["call_id"], error["shard"], error["log_id"]) == (
        "poison-1",
        shard,
        poison_id,
    )
    assert any(line["message"].startswith("maintenance: ") for line in lines["worker-0"])
    messages = [line["message"] for line in everything]
    assert not [m for m in messages if "Job OK" in m or "Enqueued job" in m or "discarded" in m]
    access = [line["message"] for line in lines["web"] if line["logger"] == "gunicorn.access"]
    assert '"GET /calls" 200' in " ".join(access), access
    assert access_paths(lines["web"]) >= {"/webhooks/stringee", "/calls", "/calls/logged-1/record"}


def test_the_access_log_is_off_unless_asked_for(make_stack: MakeStack) -> None:
    stack = make_stack(LOG_FORMAT="json")
    stack.start_web(1)
    assert stack.post(event("quiet-1", "ringing", 1)).ok
    assert stack.get("/calls?active=true").ok
    stack.stop()
    lines = [json.loads(line) for line in (stack.workdir / "web.log").read_text().splitlines()]
    assert [line["message"] for line in lines if line["logger"] == "gunicorn.error"], (
        "gunicorn logs"
    )
    assert access_paths(lines) == set()


def set_aside(stack: Stack, log_id: str) -> bool:
    """Whether the drainer has quarantined the log entry (after logging it)."""
    kept = stack.redis.client().lrange(stack.keys.quarantine(), 0, -1)
    return any(json.loads(item).get("log_id") == log_id for item in kept)


def access_paths(lines: list[dict[str, Any]]) -> set[str]:
    """The paths of the access log's lines (`host "METHOD PATH" status time`)."""
    return {
        line["message"].split('"')[1].split()[1]
        for line in lines
        if line["logger"] == "gunicorn.access"
    }


TOKEN = "S3cretReadToken42"
NUMBER = NUMBERS[1]
# Request lines gunicorn refuses, and logs at WARNING with their query string.
MALFORMED = (
    f"GET /?token={TOKEN} x HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET /?token={TOKEN}\t HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET  /?token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET http://x/?token={TOKEN}:: HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET /calls?number={NUMBER}\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET /calls?number={NUMBER}\r\nHost: x\r\n\r\n",
    f"GET /calls?active=true&number={NUMBER}&user=a b HTTP/1.1\r\nHost: x\r\n\r\n",
)


def send_raw(url: str, text: str) -> bytes:
    parsed = urlparse(url)
    assert parsed.hostname is not None and parsed.port is not None
    with socket.create_connection((parsed.hostname, parsed.port), timeout=5) as sock:
        sock.sendall(text.encode("latin-1"))
        return sock.recv(4096)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_malformed_request_line_leaves_no_token_or_number_in_the_log(
    make_stack: MakeStack, log_format: str
) -> None:
    """A sloppy script or a scanner: gunicorn refuses the request and logs why, at WARNING."""
    stack = make_stack(LOG_FORMAT=log_format, CALLSTATE_API_TOKEN=TOKEN)
    stack.start_web(1)
    answers = [send_raw(stack.web_url, text) for text in MALFORMED]
    assert sum(answer.startswith(b"HTTP/1.1 400") for answer in answers) >= len(MALFORMED) - 1
    stack.stop()
    web_log = (stack.workdir / "web.log").read_text(errors="replace")
    assert "Invalid request" in web_log, "gunicorn logged the refusals"
    leaked = [line for line in web_log.splitlines() if TOKEN in line or NUMBER in line]
    assert not leaked, "\n".join(leaked)
