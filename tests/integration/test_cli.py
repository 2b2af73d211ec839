"""The `callstate` entry point as an operator runs it, against a real stack fed real webhooks."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.factories import body, ended, event
from tests.integration.stack import BIN, REPO, Stack, wait_until

MakeStack = Callable[..., Stack]
CALLER, CALLEE = "84899199866", "84909985668"


def follow_records(stack: Stack, out: Path) -> subprocess.Popen[bytes]:
    """`records --follow` as an operator runs it at a terminal, where Ctrl-C reaches it: a test
    run started in the background (`make test &`) ignores SIGINT, and its children would too."""
    return subprocess.Popen(
        [str(BIN / "callstate"), "records", "--follow", "--json"],
        cwd=REPO,
        env=stack.env,
        stdout=out.open("wb"),
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_an_operator_follows_a_call_from_webhook_to_record(
    make_stack: MakeStack, tmp_path: Path
) -> None:
    stack = make_stack()
    stack.start_web(1)
    stack.start_workers(1)
    for status, ts in (("ringing", 1515859261381), ("answered", 1515859262381)):
        assert stack.post(event("cli-1", status, ts)).ok
    assert stack.post(event("cli-2", "ringing", 1515859261381, request_from_user_id="lan")).ok
    assert stack.post_raw(body(event("cli-3", "ringing", 1, duration=-1))).status_code == 422
    wait_until(lambda: stack.get("/calls/cli-2").ok, 20, "the events to be applied")

    active = stack.cli("active")
    assert active.returncode == 0, active.stderr
    header, *rows, summary = active.stdout.splitlines()
    assert header.split()[:3] == ["CALL", "STATUS", "SINCE"]
    assert {row.split()[0]: row.split()[1] for row in rows} == {
        "cli-1": "answered",
        "cli-2": "ringing",
    }
    assert CALLEE in rows[0] and summary == "2 of 2 active calls"
    by_user = stack.cli("active", "--user", "lan", "--json")
    assert json.loads(by_user.stdout) == stack.get("/calls?active=true&user=lan").json()

    out = tmp_path / "follow.jsonl"
    follower = follow_records(stack, out)
    try:
        assert stack.post(ended("cli-1", 1515859270000, "USER_END_CALL", 8)).ok
        wait_until(lambda: out.read_text().endswith("\n"), 20, "the record to be followed")
    finally:
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=20)
    assert follower.returncode == 0, err
    [followed] = [json.loads(line) for line in out.read_text().splitlines()]
    assert followed["call_id"] == "cli-1"
    assert followed["record"] == stack.get("/calls/cli-1/record").json()
    assert followed["record"]["disposition"] == "answered"

    shown = stack.cli("show", "cli-1")
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(None, 1) for line in shown.stdout.splitlines() if line[0] != " ")
    assert (lines["status"], lines["from"], lines["to"]) == ("ended", CALLER, CALLEE)
    assert lines["record"].startswith("revision 1: answered")
    as_json = json.loads(stack.cli("show", "cli-1", "--json").stdout)
    assert as_json.pop("record") == followed["record"]
    assert as_json == stack.get("/calls/cli-1").json()

    journal = stack.cli("events", "cli-1", "--json")
    assert json.loads(journal.stdout) == stack.get("/calls/cli-1/events").json()
    verdicts = [row.split()[3] for row in stack.cli("events", "cli-1").stdout.splitlines()[1:]]
    assert verdicts == ["ringing", "answered", "ended"]

    records = json.loads(stack.cli("records", "--json").stdout)
    assert records == [followed]
    since = stack.cli("records", "--since", followed["id"].split("-")[0])
    assert [row.split()[2] for row in since.stdout.splitlines()[1:]] == ["cli-1"]

    [refused] = json.loads(stack.cli("quarantine", "--json").stdout)
    assert (refused["status"], refused["error"], refused["field"]) == (
        422,
        "out_of_range",
        "duration",
    )
    assert "422  out_of_range" in stack.cli("quarantine").stdout

    figures = json.loads(stack.cli("stats", "--json").stdout)
    assert (figures["logged"], figures["applied"], figures["records"]) == (4, 4, 1)
    assert (figures["verdicts"], figures["active"]) == ({"accepted": 4}, {"ringing": 1})
    assert (figures["quarantined"], figures["quarantine_size"]) == (1, 1)
    [total] = [row.split() for row in stack.cli("stats").stdout.splitlines() if row[:4] == "all "]
    assert total[:4] == ["all", "4", "4", "0"]

    missing = stack.cli("show", "no-such-call")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert "no such call" in missing.stderr
    stack.redis.stop()
    down = stack.cli("records")
    assert down.returncode == 2
    assert "cannot reach Redis" in down.stderr
