"""The records history over the real stack: calls posted through the webhook, then searched,
paged, exported over HTTP in both formats and by the command line."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

from tests.factories import SCENARIOS, scenario
from tests.integration.stack import Stack, wait_until

MakeStack = Callable[..., Stack]
START_MS = 1_764_000_000_000  # 2025-11-24T16:00:00Z


def calls() -> dict[str, list[dict[str, Any]]]:
    """Ten calls, two of each kind, a minute apart; the second of each placed by user `lan`
    to its own number."""
    found = {}
    for n in range(10):
        kind, call_id = SCENARIOS[n % 5], f"hist-{n}"
        events = scenario(call_id, kind, START_MS + n * 60_000)
        if n >= 5:
            for payload in events:
                payload["request_from_user_id"] = "lan"
                if kind != "call_center":
                    payload["to"] = dict(payload["to"], number=f"8490000000{n}")
        found[call_id] = events
    return found


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [record["call_id"] for record in records]


def test_records_are_searched_paged_and_exported(make_stack: MakeStack) -> None:
    stack = make_stack()
    stack.start_web(1)
    stack.start_workers(1)
    posted = calls()
    for events in posted.values():
        for payload in events:
            assert stack.post(payload).ok
    newest_first = [f"hist-{n}" for n in reversed(range(10))]

    def everything() -> list[dict[str, Any]] | None:
        found: list[dict[str, Any]] = stack.get("/records?limit=500").json()["records"]
        return found if len(found) == 10 else None

    records = wait_until(everything, 30, "ten records in the history")
    assert ids(records) == newest_first
    for record in records:
        assert record == stack.get(f"/calls/{record['call_id']}/record").json()

    pages, cursor = [], ""
    while True:
        page = stack.get(f"/records?limit=4{cursor}").json()
        pages.append(ids(page["records"]))
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert pages == [newest_first[:4], newest_first[4:8], newest_first[8:]]

    def search(query: str) -> list[str]:
        answer = stack.get(f"/records?{query}")
        assert answer.status_code == 200, answer.text
        return ids(answer.json()["records"])

    assert search("disposition=busy") == ["hist-6", "hist-1"]
    assert search("direction=inbound") == ["hist-9", "hist-4"]
    assert search("user=lan&disposition=answered") == ["hist-9", "hist-5"]
    assert search("number=84900000006") == ["hist-6"]
    assert search("since=2025-11-24T16:02:00Z&until=1764000300000") == [
        "hist-4",
        "hist-3",
        "hist-2",
    ]
    assert stack.get("/records?direction=up").json()["field"] == "direction"

    jsonl = stack.get("/records.jsonl?user=lan")
    assert jsonl.headers["Content-Type"] == "application/x-ndjson"
    assert [json.loads(line) for line in jsonl.text.splitlines()] == records[:5]

    exported = stack.get("/records.csv")
    assert exported.headers["Content-Type"] == "text/csv; charset=utf-8"
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [row["call_id"] for row in rows] == newest_first
    busy = rows[newest_first.index("hist-1")]
    assert busy["disposition"] == "busy" and busy["sip_code"] == "486"
    assert busy["start_time"] == "2025-11-24T16:01:00.000Z"
    assert busy["end_ms"] == str(START_MS + 60_000 + 2)
    assert busy["end_time"] == "2025-11-24T16:01:00.002Z"
    answered = rows[newest_first.index("hist-0")]
    assert answered["answer_ms"] == str(START_MS + 3) and answered["answerDuration"] == "42"
    assert rows[newest_first.index("hist-4")]["agent"] == "agent-3"

    by_cli = stack.cli("records", "export", "--format", "csv")
    assert by_cli.returncode == 0, by_cli.stderr
    assert by_cli.stdout.replace("\r\n", "\n") == exported.text.replace("\r\n", "\n")
    by_cli = stack.cli(
        "records", "export", "--format", "jsonl", "--user", "lan", "--since", "1764000000000"
    )
    assert by_cli.returncode == 0, by_cli.stderr
    assert by_cli.stdout == jsonl.text
