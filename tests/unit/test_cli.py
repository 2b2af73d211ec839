"""The `callstate` command line through `main(argv)`, on fakeredis: output, JSON, exit codes."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from redis import Redis

from callstate import cli
from callstate.calls import Doc
from callstate.codec import pack_doc
from callstate.config import Settings
from callstate.store import Store
from callstate.web import create_app
from tests.factories import body, ended, event, record_of, to_agent
from tests.integration.stack import free_port

Run = Callable[..., tuple[int, str, str]]
RINGING_AT = "2018-01-13 16:01:01.381"


@pytest.fixture
def run(redis: Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """`callstate ARGS` against the test's fakeredis; its exit code, stdout and stderr."""
    monkeypatch.setattr(cli, "connect", lambda url: redis)
    # Logging is set up once per process; here it would take pytest's own handlers away.
    monkeypatch.setattr(cli, "configure_logging", lambda log_format: None)
    for name in ("CALLSTATE_SHARDS", "CALLSTATE_KEY_PREFIX", "LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)

    def callstate(*args: str) -> tuple[int, str, str]:
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return callstate


@pytest.fixture
def calls(deliver: Callable[..., Doc]) -> None:
    """An ended busy call, and two active ones: one ringing an agent, one answered."""
    deliver(
        event("done-1", "ringing", 1515859261381),
        event("done-1", "ringing", 1515859261381),
        ended("done-1", 1515859270000, "486 Busy Here", 0),
    )
    deliver(event("live-1", "ringing", 1515859261381, to=to_agent("84900000001")))
    deliver(
        event("live-2", "ringing", 1515859261000, request_from_user_id="lan"),
        event("live-2", "answered", 1515859262000, request_from_user_id="lan"),
    )


def api(settings: Settings, redis: Redis, path: str) -> Any:
    """What the HTTP API answers for the same store, to hold the CLI's JSON against."""
    return create_app(settings, redis).test_client().get(path).get_json()


@pytest.mark.usefixtures("calls")
def test_show_prints_the_call_for_a_person_and_the_api_view_for_a_script(
    run: Run, settings: Settings, redis: Redis
) -> None:
    code, out, _ = run("show", "done-1")
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith(" "))
    assert lines["status"] == "ended"
    assert lines["from"] == "84899199866"
    assert lines["to"] == "84909985668"
    assert lines["timeline"] == f"ringing    {RINGING_AT}"
    assert lines["record"].startswith("revision 1: busy, SIP 486, 9s long, 0s answered")
    assert "duplicate=1" in lines["counts"]

    code, out, _ = run("show", "done-1", "--json")
    shown = json.loads(out)
    assert code == 0
    assert shown.pop("record") == api(settings, redis, "/calls/done-1/record")
    assert shown == api(settings, redis, "/calls/done-1")


@pytest.mark.usefixtures("calls")
def test_events_shows_each_verdict_in_arrival_order(
    run: Run, settings: Settings, redis: Redis
) -> None:
    code, out, _ = run("events", "done-1")
    header, *rows = out.splitlines()
    assert code == 0
    assert header.split() == [
        "LOG",
        "ID",
        "RECEIVED",
        "STATUS",
        "EVENT",
        "TIME",
        "VERDICT",
        "REASON",
    ]
    assert [row.split()[3:8] for row in rows] == [
        ["ringing", *RINGING_AT.split(), "accepted", "-"],
        ["ringing", *RINGING_AT.split(), "duplicate", "-"],
        ["ended", "2018-01-13", "16:01:10.000", "accepted", "-"],
    ]
    code, out, _ = run("events", "done-1", "--json")
    assert code == 0
    assert json.loads(out) == api(settings, redis, "/calls/done-1/events")


@pytest.mark.parametrize("command", ["show", "events"])
def test_an_unknown_call_exits_1_with_a_message_and_the_apis_404_body_as_json(
    run: Run, settings: Settings, redis: Redis, command: str
) -> None:
    code, out, err = run(command, "no-such-call")
    assert (code, out) == (1, "")
    assert "no such call: no-such-call" in err
    code, out, _ = run(command, "no-such-call", "--json")
    path = "/calls/no-such-call" + ("/events" if command == "events" else "")
    assert (code, json.loads(out)) == (1, api(settings, redis, path))


@pytest.mark.parametrize(
    "argv",
    [
        ["active", "--limit", "99999999999999999999"],
        ["records", "--limit", "²"],
        ["records", "--since", "99999999999999999999999"],
        ["quarantine", "--limit", "0"],
    ],
)
def test_an_argument_out_of_range_is_a_usage_error(run: Run, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run(*argv)
    assert exited.value.code == 2


def test_a_redis_url_that_is_not_one_exits_2_without_repeating_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", "nonsense://user:s3cret@host")
    monkeypatch.setattr(cli, "configure_logging", lambda log_format: None)
    assert cli.main(["show", "x"]) == 2
    assert "s3cret" not in capsys.readouterr().err


@pytest.mark.usefixtures("calls")
def test_active_lists_calls_in_aligned_columns_and_filters_as_the_api_does(
    run: Run, settings: Settings, redis: Redis
) -> None:
    code, out, _ = run("active")
    header, *rows, summary = out.splitlines()
    assert code == 0
    assert [row.split()[0] for row in rows] == ["live-2", "live-1"]
    assert summary == "2 of 2 active calls"
    for column in ("STATUS", "FROM", "TO", "USER"):
        assert {row[header.index(column) - 1] for row in rows} == {" "}
    assert rows[1][header.index("TO") :].startswith("84900000001")

    code, out, _ = run("active", "--user", "lan", "--json")
    assert code == 0
    assert json.loads(out) == api(settings, redis, "/calls?active=true&user=lan")
    code, out, _ = run("active", "--number", "84900000001", "--limit", "1", "--json")
    assert json.loads(out) == api(settings, redis, "/calls?active=true&number=84900000001&limit=1")
    assert [call["call_id"] for call in json.loads(out)["calls"]] == ["live-1"]


def test_records_shows_the_latest_or_those_since_a_time(
    run: Run, deliver: Callable[..., Doc], store: Store
) -> None:
    for n in range(3):
        deliver(event(f"r-{n}", "ringing", 1), ended(f"r-{n}", 2, "480", 0))
    ids = [entry["id"] for entry in json.loads(run("records", "--json")[1])]
    assert len(ids) == 3

    code, out, _ = run("records", "--limit", "2")
    header, *rows = out.splitlines()
    assert code == 0
    assert header.split()[:4] == ["LOGGED", "CALL", "REV", "DISPOSITION"]
    assert [row.split()[2] for row in rows] == ["r-1", "r-2"]
    assert rows[0].split()[4:6] == ["no_answer", "480"]

    second_ms = int(ids[1].split("-")[0])
    code, out, _ = run("records", "--since", str(second_ms), "--json")
    shown = json.loads(out)
    assert code == 0
    assert [item["id"] for item in shown] == ids[1:]
    assert shown[0]["record"] == record_of(store.docs.get_doc("r-1"))

    iso = datetime.fromtimestamp(second_ms / 1000, UTC).isoformat()
    assert [i["call_id"] for i in json.loads(run("records", "--since", iso, "--json")[1])] == [
        "r-1",
        "r-2",
    ]
    future = run("records", "--since", "2999-01-01T00:00:00+07:00", "--json")
    assert future[:2] == (0, "[]\n")


@pytest.mark.parametrize(
    "argv", [["records", "--since", "yesterday"], ["active", "--limit", "0"], ["show"], ["nope"]]
)
def test_bad_usage_exits_2(run: Run, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run(*argv)
    assert exited.value.code == 2


def test_help_states_the_exit_codes(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run("--help")
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for command in ("show", "events", "active", "records", "quarantine", "rebuild", "doctor"):
        assert f"\n    {command} " in shown or f"\n    {command}\n" in shown
    assert "  1  not found" in shown
    assert "  2  Redis cannot be reached" in shown


def test_quarantine_shows_refused_deliveries_newest_first(
    run: Run, settings: Settings, redis: Redis
) -> None:
    client = create_app(settings, redis).test_client()
    client.post("/webhooks/stringee", data=b"{not json", content_type="application/json")
    bad = body(event("q-1", "ringing", 1, duration=-1))
    client.post("/webhooks/stringee", data=bad, content_type="application/json")

    code, out, _ = run("quarantine")
    header, *rows = out.splitlines()
    assert code == 0
    assert header.split() == ["RECEIVED", "STATUS", "ERROR", "FIELD", "BYTES", "WHERE", "MESSAGE"]
    assert [row.split()[2:5] for row in rows] == [
        ["422", "out_of_range", "duration"],
        ["400", "invalid_json", "-"],
    ]
    assert rows[0][header.index("STATUS") :].startswith("   422  ")  # numbers to the right
    code, out, _ = run("quarantine", "--limit", "1", "--json")
    [item] = json.loads(out)
    assert (code, item["error"], item["bytes"]) == (0, "out_of_range", len(bad))
    assert "84909985668" not in item["body"]


@pytest.mark.usefixtures("calls")
def test_rebuild_check_reports_a_difference_with_exit_1(run: Run, store: Store) -> None:
    code, out, _ = run("rebuild", "--check", "--json")
    assert (code, json.loads(out)) == (
        0,
        {"compared": 3, "differing": [], "left": {}, "rewritten": 0},
    )
    doc = store.docs.get_doc("live-1")
    assert doc is not None
    store.redis.set(store.keys.call("live-1"), pack_doc({**doc, "status": "answered"}))
    code, out, _ = run("rebuild", "--check")
    assert code == 1
    assert out.splitlines() == ["3 calls compared, 1 differ", "differs: live-1"]


@pytest.mark.usefixtures("calls")
def test_stats_shows_the_figures_per_shard_and_in_all(run: Run, store: Store) -> None:
    code, out, _ = run("stats", "--json")
    figures = json.loads(out)
    assert code == 0
    assert {name: figures[name] for name in ("logged", "applied", "backlog", "records")} == {
        "logged": 6,
        "applied": 6,
        "backlog": 0,
        "records": 1,
    }
    assert figures["verdicts"] == {"accepted": 5, "duplicate": 1}
    assert figures["active"] == {"ringing": 1, "answered": 1}
    assert [shard["shard"] for shard in figures["shards"]] == [0, 1, 2, 3]
    assert figures["shards"][0]["drain_seconds"]["buckets"][-1] == ["+Inf", 0]

    store.log.append_event("late-1", body(event("late-1", "ringing", 1)))
    code, out, _ = run("stats")
    lines = out.splitlines()
    assert code == 0
    assert lines[2].split() == [
        "SHARD",
        "LOGGED",
        "APPLIED",
        "BACKLOG",
        "OLDEST",
        "RECORDS",
        "ACTIVE",
        "DRAINS",
        "MEAN",
        "DRAIN",
    ]
    [total] = [line.split() for line in lines if line.startswith("all ")]
    assert total[:4] == ["all", "7", "6", "1"]
    assert total[4].endswith("s")
    assert "duplicate        1" in out
    assert out.endswith("quarantine: 0 kept, 0 quarantined in all\n")


def test_an_unreachable_redis_exits_2_without_its_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "configure_logging", lambda log_format: None)
    monkeypatch.setenv("REDIS_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    assert cli.main(["active"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "cannot reach Redis at 127.0.0.1:" in err
    assert "hunter2" not in err


def test_a_bad_setting_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOG_FORMAT", "xml")
    assert cli.main(["active"]) == 2
    assert "LOG_FORMAT must be one of text, json" in capsys.readouterr().err


def test_a_reader_that_goes_away_ends_the_command_quietly(
    redis: Redis, monkeypatch: pytest.MonkeyPatch, calls: None
) -> None:
    """`callstate records | head -1`: the pipe closes under the command, which exits 0."""
    monkeypatch.setattr(cli, "connect", lambda url: redis)
    monkeypatch.setattr(cli, "configure_logging", lambda log_format: None)
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        assert cli.main(["records", "--json"]) == 0


def test_records_export_writes_the_history_as_csv_or_jsonl(
    run: Run, deliver: Callable[..., Doc]
) -> None:
    busy = record_of(deliver(*_two_calls()[0]))
    answered = record_of(deliver(*_two_calls()[1]))
    code, out, _ = run("records", "export", "--since", "2018-01-13T16:01:00Z")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("call_id,revision,start_time,start_ms,")
    assert [line.split(",")[0] for line in lines[1:]] == ["exp-answered", "exp-busy"]
    code, out, _ = run("records", "export", "--format", "jsonl", "--disposition", "busy")
    assert code == 0 and [json.loads(line) for line in out.splitlines()] == [busy]
    code, out, _ = run("records", "export", "--format", "jsonl", "--until", "1515859270001")
    assert [json.loads(line) for line in out.splitlines()] == [busy]
    assert answered["disposition"] == "answered"


def test_records_export_refuses_an_empty_range(run: Run) -> None:
    code, out, err = run("records", "export", "--since", "2000", "--until", "1000")
    assert (code, out) == (2, "") and "--until must be later than --since" in err


def test_records_without_a_subcommand_still_reads_the_stream(
    run: Run, deliver: Callable[..., Doc]
) -> None:
    deliver(*_two_calls()[0])
    code, out, _ = run("records", "--json", "--limit", "5")
    assert code == 0 and [item["call_id"] for item in json.loads(out)] == ["exp-busy"]


def _two_calls() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return (
        [event("exp-busy", "ringing", 1515859261381), ended("exp-busy", 1515859270000, "486", 0)],
        [
            event("exp-answered", "ringing", 1515859271000),
            event("exp-answered", "answered", 1515859272000),
            ended("exp-answered", 1515859280000, "USER_END_CALL", 8),
        ],
    )


def test_export_store_writes_json_lines_and_import_store_refuses_a_non_empty_store(
    run: Run, calls: None, redis: Redis, tmp_path: Any
) -> None:
    code, out, err = run("export-store")
    assert code == 0, err
    header = json.loads(out.splitlines()[0])
    assert (header["format"], header["version"], header["shards"]) == ("callstate-store", 1, 4)
    assert header["counts"]["call"] == 3 and "exported" in err
    assert json.loads(out.splitlines()[-1])["kind"] == "end"
    exported = tmp_path / "store.jsonl"
    exported.write_text(out)
    code, _, err = run("import-store", "--input", str(exported))
    assert code == 1 and "not empty" in err
    redis.flushall()
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('{"hello": 1}\n')
    code, _, err = run("import-store", "--input", str(garbage))
    assert code == 1 and "not a callstate store export" in err
    code, _, err = run("import-store", "--input", str(exported))
    assert code == 0 and "into 4 shards" in err
    code, out, _ = run("show", "done-1", "--json")
    assert code == 0 and json.loads(out)["status"] == "ended"


def test_export_store_is_refused_while_a_backlog_waits(run: Run, store: Store) -> None:
    store.log.append_event("waiting", body(event("waiting", "ringing", 1)))
    code, out, err = run("export-store")
    assert code == 1 and out == ""
    assert "not applied" in err
