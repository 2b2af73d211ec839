"""Record forwarding end to end: gunicorn, the event workers, the records worker and real HTTP
receivers on loopback, one misbehaving on a schedule, one down until the retries give up."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from tests.factories import ended, event
from tests.integration.stack import Stack, free_port, wait_until
from tests.receiver import DROP, FAIL, OK, SLOW, TIMEOUT, Receiver

MakeStack = Callable[..., Stack]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CALLS = 12
# What the misbehaving receiver does with its first requests; every later one is answered 200.
SCHEDULE = {0: FAIL, 2: TIMEOUT, 4: DROP, 6: SLOW, 8: FAIL, 10: DROP, 12: SLOW, 14: TIMEOUT}


def misbehaving(n: int) -> str:
    return SCHEDULE.get(n, OK)


def revision_of(stack: Stack, call_id: str) -> int | None:
    response = stack.get(f"/calls/{call_id}/record")
    return int(response.json()["revision"]) if response.status_code == 200 else None


def in_call_order(ids: list[str], call_id: str) -> list[str]:
    return [message_id for message_id in ids if message_id.rsplit(":", 1)[0] == call_id]


def dead_letters(stack: Stack) -> int:
    redis = stack.redis.client()
    return sum(redis.llen(stack.keys.dead_letters(shard)) for shard in range(8))


def test_every_revision_arrives_once_in_order_and_dead_letters_are_redelivered(
    make_stack: MakeStack,
) -> None:
    down_port = free_port()  # nothing listens here until the retries have given up
    with Receiver(SECRET, misbehaving, hold_seconds=1.5) as flaky:
        down_url = f"http://127.0.0.1:{down_port}/records?token=t0ps3cret"
        stack = make_stack(
            CALLSTATE_RECORD_WEBHOOK_URL=f"{flaky.url},{down_url}",
            CALLSTATE_RECORD_WEBHOOK_SECRET=SECRET,
            CALLSTATE_RECORD_WEBHOOK_TIMEOUT_SECONDS="1",
            CALLSTATE_RECORD_RETRY_FIRST_SECONDS="1",
            CALLSTATE_RECORD_RETRY_TOTAL_SECONDS="3",  # attempts 1 and 2 s apart: 3 in 3 s
        )
        stack.start_web()
        stack.start_workers(2)
        stack.spawn("records", [sys.executable, "-m", "workers.records"])
        stack.spawn("retries", [sys.executable, "-m", "workers.records", "--retries"])
        calls = [f"fwd-{n}" for n in range(CALLS)]
        for n, call_id in enumerate(calls):
            assert stack.post(event(call_id, "ringing", 1000 + n)).ok
            assert stack.post(ended(call_id, 9000 + n, "486 Busy Here", 0)).ok
        wait_until(lambda: all(revision_of(stack, c) for c in calls), 20, "every first record")
        for call_id in calls[::2]:  # a late notice after the end: a second revision
            notice = {"type": "recording", "call_id": call_id, "recording_url": "https://r/1"}
            assert stack.post(notice).ok
        wait_until(
            lambda: all(revision_of(stack, c) == 2 for c in calls[::2]), 20, "second revisions"
        )
        revisions = {call_id: revision_of(stack, call_id) or 0 for call_id in calls}
        expected = {f"{c}:{r}" for c, last in revisions.items() for r in range(1, last + 1)}
        assert len(expected) == CALLS + CALLS // 2

        wait_until(lambda: set(flaky.accepted.ids) >= expected, 30, "every revision delivered")
        assert set(flaky.accepted.ids) == expected
        assert flaky.accepted.bad_signatures == 0
        for call_id in calls:
            assert in_call_order(flaky.accepted.ids, call_id) == [
                f"{call_id}:{r}" for r in range(1, revisions[call_id] + 1)
            ]
        assert flaky.accepted.arrivals > len(expected)  # the schedule did make it retry
        body: dict[str, Any] = flaky.accepted.bodies[f"{calls[0]}:2"]
        assert body["revision"] == 2 and body["recording_url"] == "https://r/1"

        # The receiver that was down got nothing and every delivery to it was given up.
        wait_until(lambda: dead_letters(stack) == len(expected), 30, "every dead letter")
        with Receiver(SECRET, port=down_port) as revived:
            done = stack.cli("records", "redeliver")
            assert done.returncode == 0, done.stderr
            assert done.stdout == f"{len(expected)} dead letters queued for delivery again\n"
            wait_until(lambda: set(revived.accepted.ids) == expected, 20, "the redelivery")
            for call_id in calls:
                assert in_call_order(revived.accepted.ids, call_id) == [
                    f"{call_id}:{r}" for r in range(1, revisions[call_id] + 1)
                ]
            assert dead_letters(stack) == 0

        stats = stack.cli("stats", "--json")
        assert '"dead_letters": 0' in stats.stdout
        log = "".join(
            (stack.workdir / f"{name}.log").read_text() for name in ("records", "retries")
        )
        warnings = [line for line in log.splitlines() if " WARNING " in line]
        assert any("attempt 1 failed (HTTP 500)" in line for line in warnings)
        assert any("dead-lettered" in line for line in warnings)
        assert "t0ps3cret" not in log and "84909985668" not in log
        assert "Traceback" not in log and " ERROR " not in log
