"""Redis under Sentinel, with real processes: the primary is SIGKILLed under load; the service
answers 503 during the switch, then 200 again without any process restarted, and, with
CALLSTATE_REPLICA_ACKS=1, every acknowledged event is applied exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.factories import body, scenario
from tests.integration.ha import SentinelSet
from tests.integration.stack import Stack, wait_until

CALLS = 90
POSTERS = 3
RETRY_FOR_SECONDS = 60

pytestmark = pytest.mark.ha  # `make test-ha`: Redis replicas and sentinels


class Poster:
    """Delivers events in order per call as the provider does: again on anything but 200."""

    def __init__(self, stack: Stack) -> None:
        self.url = f"{stack.web_url}/webhooks/stringee"
        self.acknowledged = 0
        self.refused: dict[str, int] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self, calls: list[list[dict[str, Any]]]) -> None:
        """Deliver `calls` from POSTERS threads, a share each, until `join`."""
        shares = [calls[n::POSTERS] for n in range(POSTERS)]
        self.threads = [threading.Thread(target=self.deliver, args=(part,)) for part in shares]
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=RETRY_FOR_SECONDS * 3)

    def deliver(self, calls: list[list[dict[str, Any]]]) -> None:
        with requests.Session() as session:
            for events in calls:
                for payload in events:
                    self.until_acknowledged(session, body(payload))

    def until_acknowledged(self, session: requests.Session, raw: bytes) -> None:
        deadline = time.monotonic() + RETRY_FOR_SECONDS
        while time.monotonic() < deadline:
            try:
                answer = session.post(
                    self.url, data=raw, headers={"Content-Type": "application/json"}, timeout=10
                )
                outcome = str(answer.status_code)
                if answer.status_code == 503:
                    outcome = answer.json()["error"]
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            with self.lock:
                if outcome == "200":
                    self.acknowledged += 1
                    return
                self.refused[outcome] = self.refused.get(outcome, 0) + 1
            time.sleep(0.05)  # the provider's retry interval, much shortened
        raise AssertionError(f"not acknowledged within {RETRY_FOR_SECONDS} s")


def assert_each_applied_once_without_a_restart(stack: Stack, calls: list[str]) -> None:
    """Every call ends, each of its three events accepted once; no process of the stack exited."""

    def applied() -> dict[str, Any] | None:
        found = {}
        for call_id in calls:
            answer = stack.get(f"/calls/{call_id}")
            if answer.status_code != 200 or answer.json()["status"] != "ended":
                return None
            found[call_id] = answer.json()
        return found

    docs = wait_until(applied, 90, "every call applied on the new primary")
    for call_id, doc in docs.items():
        assert doc["counts"]["accepted"] == 3, (call_id, doc["counts"])
        assert doc["counts"]["rejected"] == 0, (call_id, doc["counts"])
    assert all(process.poll() is None for process in stack.processes.values()), "restarted"


def test_a_primary_killed_under_load_loses_no_acknowledged_event(
    sentinels: SentinelSet, tmp_path: Path
) -> None:
    stack = Stack(
        sentinels,
        tmp_path,
        {
            **sentinels.env,
            "CALLSTATE_SHARDS": "4",
            "CALLSTATE_REPLICA_ACKS": "1",
            "CALLSTATE_DRAIN_LOCK_SECONDS": "5",
            "CALLSTATE_MAINTENANCE_INTERVAL_SECONDS": "1",
        },
    )
    try:
        stack.start_workers(2)
        stack.start_scheduler()
        stack.start_web(2)
        first_primary = sentinels.primary_port()
        calls = {f"ha-{n}": scenario(f"ha-{n}", "busy", 1_000 * n) for n in range(CALLS)}
        poster = Poster(stack)
        poster.start(list(calls.values()))
        wait_until(lambda: poster.acknowledged >= CALLS, 60, "a third of the events")
        sentinels.primary.kill()
        poster.join()
        assert poster.acknowledged == 3 * CALLS

        assert sentinels.primary_port() != first_primary
        assert poster.refused, "no delivery was refused: the switch went unseen"
        assert set(poster.refused) <= {"unavailable", "not_replicated"}, poster.refused

        assert_each_applied_once_without_a_restart(stack, list(calls))
    finally:
        stack.stop()
        print(stack.logs())
