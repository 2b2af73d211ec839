"""Record forwarding on fakeredis, against a real loopback receiver: outbox, order, chains,
retries, dead letters, redelivery, settings and signatures."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq import Retry, Worker
from rq.job import Job
from standardwebhooks import Webhook

from callstate import cli, coordination, forwarding
from callstate.config import Settings
from callstate.connection import text
from callstate.delivery import Destination, Sender
from callstate.drain import Drainer
from callstate.forwarding import Forwarder, retry_schedule
from callstate.machine import CallMachine
from callstate.store import Store
from callstate.web import create_app
from tests.factories import body, ended, event
from tests.receiver import FAIL, OK, Receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(SECRET) as running:
        yield running


def forwarding_settings(tmp_path: Path, *urls: str) -> Settings:
    return Settings(
        redis_url="redis://fake",
        embedded_redis=False,
        var_dir=tmp_path,
        shards=4,
        record_webhook_urls=urls,
        record_webhook_secret=SECRET,
        record_webhook_timeout_seconds=1,
        record_retry_first_seconds=1,
        record_retry_total_seconds=3,
    )


class Pipeline:
    """The drainers' side with forwarding on, and the forwarder, on one fakeredis, or with RQ's
    queues and the delivery jobs' state on a second one."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        machine: CallMachine,
        queue_redis: Redis | None = None,
    ) -> None:
        self.store = Store(redis, settings, queue_redis)
        self.forwarder = Forwarder(redis, settings, queue_redis)
        self.woken: list[int] = []
        self.drainer = Drainer(
            self.store,
            machine,
            batch=50,
            slice_ms=60_000,
            linger_ms=0,
            window_ms=0,
            wake=lambda shard: None,
            on_records=self.woken.append,
        )

    def apply(self, *payloads: dict[str, Any]) -> int:
        """Log and apply the payloads; return the shard of the last one."""
        shard = 0
        for payload in payloads:
            _, shard, _ = self.store.log.append_event(payload["call_id"], body(payload))
            self.drainer.drain(shard)
        return shard

    def pending_jobs(self, shard: int) -> dict[str, tuple[int, int]]:
        """Delivery jobs waiting, by id: their (shard, tried) arguments."""
        ids = self.store.queue_redis.hkeys(self.store.keys.forward_pending(shard))
        found = {}
        for raw in ids:
            job = Job.fetch(text(raw), connection=self.store.queue_redis)
            found[job.id] = (job.args[0], job.args[1])
        return found

    def counters(self, shard: int) -> dict[str, int]:
        raw = self.store.queue_redis.hgetall(self.store.keys.forward_counters(shard))
        return {text(k): int(v) for k, v in raw.items()}


@pytest.fixture(params=["one Redis", "queue Redis of its own"])
def pipeline_for(
    request: pytest.FixtureRequest, redis: Redis, tmp_path: Path, machine: CallMachine
) -> Iterator[Any]:
    queue_redis = (
        fakeredis.FakeRedis(server=fakeredis.FakeServer()) if request.param != "one Redis" else None
    )

    def build(*urls: str) -> Pipeline:
        return Pipeline(redis, forwarding_settings(tmp_path, *urls), machine, queue_redis)

    yield build


def a_call(call_id: str, start: int = 1000) -> list[dict[str, Any]]:
    return [event(call_id, "ringing", start), ended(call_id, start + 5000, "486 Busy Here", 0)]


def test_schedule_doubles_to_an_hour_and_stays_within_the_total() -> None:
    schedule = retry_schedule(10, 86400)
    assert schedule[:5] == [10, 20, 40, 80, 160]
    assert max(schedule) == 3600
    assert sum(schedule) <= 86400 < sum(schedule) + 3600
    assert retry_schedule(1, 3) == [1, 2]
    assert retry_schedule(10, 5) == []


def test_off_by_default_the_commit_writes_no_outbox(store: Store, deliver: Any) -> None:
    deliver(*a_call("quiet-1"))
    shard = store.keys.shard_of("quiet-1")
    assert not store.settings.forwarding
    assert store.redis.exists(store.keys.outbox(shard)) == 0


def test_every_revision_is_delivered_signed_with_a_stable_id(
    pipeline_for: Any, receiver: Receiver
) -> None:
    pipe = pipeline_for(receiver.url)
    shard = pipe.apply(*a_call("fwd-1"))
    notice = {"type": "recording", "call_id": "fwd-1", "recording_url": "https://r/1.mp3"}
    pipe.apply(notice)
    assert pipe.woken == [shard, shard]  # one wake per commit that published
    assert pipe.store.redis.xlen(pipe.store.keys.outbox(shard)) == 2
    owed = pipe.store.redis.xrange(pipe.store.keys.outbox(shard))
    published = pipe.store.redis.xrange(pipe.store.keys.records(shard))
    # Kept packed, a quarter of the bytes; sent as the very text the records stream holds.
    assert len(owed) == len(published) == 2
    for (_, owed_fields), (_, published_fields) in zip(owed, published, strict=True):
        assert len(owed_fields[b"record"]) * 2 < len(published_fields[b"record"])
    assert pipe.forwarder.forward(shard) == 2
    assert receiver.accepted.ids == ["fwd-1:1", "fwd-1:2"]
    assert receiver.accepted.bad_signatures == 0
    assert receiver.accepted.bodies["fwd-1:2"]["recording_url"] == "https://r/1.mp3"
    assert [receiver.accepted.bodies[f"fwd-1:{n}"] for n in (1, 2)] == [
        json.loads(fields[b"record"]) for _, fields in published
    ]
    assert pipe.store.redis.xlen(pipe.store.keys.outbox(shard)) == 0
    assert pipe.counters(shard) == {"delivered": 2}


def test_signature_verifies_with_the_standard_library() -> None:
    sender = Sender(SECRET, 1)
    payload = '{"call_id": "x", "revision": 1}'
    headers = sender.headers("x:1", payload)
    assert Webhook(SECRET).verify(payload, headers) == {"call_id": "x", "revision": 1}
    assert set(headers) >= {"webhook-id", "webhook-timestamp", "webhook-signature"}
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + "A" * 32).verify(payload, headers)


def test_a_failure_queues_a_retry_and_the_next_revision_waits_for_it(
    pipeline_for: Any, receiver: Receiver
) -> None:
    receiver.behaviour = lambda n: FAIL if n == 0 else OK
    pipe = pipeline_for(receiver.url)
    shard = pipe.store.keys.shard_of("chain-1")
    other = next(
        f"other-{n}" for n in range(100) if pipe.store.keys.shard_of(f"other-{n}") == shard
    )
    pipe.apply(*a_call("chain-1"), *a_call(other, 2000))
    pipe.apply({"type": "recording", "call_id": "chain-1", "recording_url": "https://r/2"})
    pipe.forwarder.forward(shard)
    # Revision 1 to retry, revision 2 waiting for it, and the other call's revision queued: the
    # receiver failed just now, so the forwarder did not wait on it again.
    jobs = pipe.pending_jobs(shard)
    assert len(jobs) == 3
    assert receiver.accepted.arrivals == 1
    statuses = {j: Job.fetch(j, connection=pipe.store.queue_redis).get_status().value for j in jobs}
    assert sorted(statuses.values()) == ["deferred", "scheduled", "scheduled"]
    # On the retries' own queue, which the forward jobs never wait behind.
    assert {Job.fetch(j, connection=pipe.store.queue_redis).origin for j in jobs} == {
        "callstate-records-retries"
    }
    [deferred] = [j for j, s in statuses.items() if s == "deferred"]
    [scheduled] = Job.fetch(deferred, pipe.store.queue_redis).dependency_ids
    assert statuses[scheduled] == "scheduled"
    assert jobs[scheduled] == (shard, 1)  # the forwarder's attempt counts
    chains = pipe.store.queue_redis.hgetall(pipe.store.keys.forward_chains(shard))
    assert chains[f"{Destination(receiver.url).id}:chain-1".encode()] == deferred.encode()
    # The retry delivers, then the waiting revision: in order, the chain ends with it.
    assert pipe.forwarder.deliver(shard, 1, scheduled, 0) is None
    assert pipe.forwarder.deliver(shard, 0, deferred, 0) is None
    assert [i for i in receiver.accepted.ids if i.startswith("chain-1")] == [
        "chain-1:1",
        "chain-1:2",
    ]
    assert pipe.store.queue_redis.hlen(pipe.store.keys.forward_chains(shard)) == 1  # the other call
    assert pipe.store.queue_redis.hlen(pipe.store.keys.forward_pending(shard)) == 1
    assert pipe.counters(shard) == {"failed": 1, "delivered": 2}


def test_the_last_failed_attempt_dead_letters_and_redeliver_queues_it_again(
    pipeline_for: Any, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.behaviour = lambda n: FAIL
    pipe = pipeline_for(receiver.url)
    shard = pipe.apply(*a_call("dead-1"))
    fwd: Forwarder = pipe.forwarder
    with caplog.at_level(logging.WARNING):
        fwd.forward(shard)
        [job_id] = pipe.pending_jobs(shard)
        retried = fwd.deliver(shard, 1, job_id, 0)  # schedule [1, 2]: the 2nd attempt
        assert isinstance(retried, Retry)
        assert retried.intervals == [2]
        assert fwd.deliver(shard, 1, job_id, 1) is None  # the 3rd and last
    lines = [r.getMessage() for r in caplog.records if r.name == "callstate.forwarding"]
    assert len(lines) == 3
    assert all("t0ps3cret" not in line and "84909985668" not in line for line in lines)
    assert "HTTP 500" in lines[0] and "dead-lettered" in lines[2]
    assert pipe.counters(shard) == {"failed": 3, "dead_lettered": 1}
    assert fwd.queue_redis.llen(fwd.keys.dead_letters(shard)) == 1
    assert fwd.queue_redis.hlen(fwd.keys.forward_chains(shard)) == 0

    receiver.behaviour = lambda n: OK
    assert fwd.redeliver() == (1, 0)
    assert fwd.queue_redis.llen(fwd.keys.dead_letters(shard)) == 0
    [again] = pipe.pending_jobs(shard)
    assert Job.fetch(again, connection=fwd.queue_redis).get_status().value == "queued"
    assert fwd.deliver(shard, 0, again, 0) is None
    assert receiver.accepted.ids == ["dead-1:1"]
    assert fwd.redeliver() == (0, 0)


def test_redeliver_keeps_letters_of_a_receiver_no_longer_configured(
    pipeline_for: Any, receiver: Receiver, tmp_path: Path, redis: Redis
) -> None:
    receiver.behaviour = lambda n: FAIL
    pipe = pipeline_for(receiver.url)
    shard = pipe.apply(*a_call("gone-1"))
    pipe.forwarder.forward(shard)
    [job_id] = pipe.pending_jobs(shard)
    pipe.forwarder.deliver(shard, 1, job_id, 1)
    elsewhere = forwarding_settings(tmp_path, "http://127.0.0.1:9/elsewhere")
    other = Forwarder(redis, elsewhere, pipe.store.queue_redis)
    assert other.redeliver() == (0, 1)
    assert pipe.store.queue_redis.llen(other.keys.dead_letters(shard)) == 1


def test_every_receiver_gets_every_revision(pipeline_for: Any) -> None:
    with Receiver(SECRET) as one, Receiver(SECRET) as two:
        pipe = pipeline_for(one.url, two.url)
        shard = pipe.apply(*a_call("both-1"))
        pipe.forwarder.forward(shard)
        assert one.accepted.ids == two.accepted.ids == ["both-1:1"]


def test_a_refused_connection_is_a_failure(pipeline_for: Any, receiver: Receiver) -> None:
    receiver.__exit__()
    outcome = Sender(SECRET, 1).send(Destination(receiver.url), "x:1", "{}")
    assert not outcome.delivered
    assert outcome.problem is not None and "127.0.0.1" not in outcome.problem


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CALLSTATE_RECORD_WEBHOOK_URL": "ftp://x/y"}, "http:// or https://"),
        ({"CALLSTATE_RECORD_WEBHOOK_URL": "https://"}, "http:// or https://"),
        ({"CALLSTATE_RECORD_WEBHOOK_URL": "http://x:notaport/"}, "http:// or https://"),
        ({"CALLSTATE_RECORD_WEBHOOK_URL": "https://x/y"}, "SECRET too"),
        (
            {"CALLSTATE_RECORD_WEBHOOK_URL": "https://x/y", "CALLSTATE_RECORD_WEBHOOK_SECRET": "s"},
            "whsec_",
        ),
        (
            {
                "CALLSTATE_RECORD_WEBHOOK_URL": "https://x/y",
                "CALLSTATE_RECORD_WEBHOOK_SECRET": "whsec_",
            },
            "whsec_",
        ),
        ({"CALLSTATE_RECORD_RETRY_TOTAL_SECONDS": "0"}, "positive"),
    ],
)
def test_settings_refuse_what_cannot_be_forwarded(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_settings_read_receivers_and_schedule() -> None:
    settings = Settings.from_env(
        {
            "CALLSTATE_RECORD_WEBHOOK_URL": "https://a.example/r?token=x, http://b.example:8080/",
            "CALLSTATE_RECORD_WEBHOOK_SECRET": SECRET,
            "CALLSTATE_RECORD_RETRY_FIRST_SECONDS": "5",
        }
    )
    assert settings.forwarding
    assert settings.record_webhook_urls == ("https://a.example/r?token=x", "http://b.example:8080/")
    assert settings.record_retry_first_seconds == 5
    assert settings.record_retry_total_seconds == 86400
    assert settings.record_queue_name == "callstate-records"
    assert not dataclasses.replace(settings, record_webhook_urls=()).forwarding


def test_metrics_show_deliveries_failures_and_dead_letters(
    pipeline_for: Any, receiver: Receiver, redis: Redis
) -> None:
    receiver.behaviour = lambda n: FAIL if n == 0 else OK
    pipe = pipeline_for(receiver.url)
    shard = pipe.apply(*a_call("metric-1"))
    pipe.forwarder.forward(shard)
    pipe.forwarder.failing_until.clear()  # the receiver's pause after its failure is over
    pipe.apply(*a_call("metric-2", 3000))
    pipe.forwarder.forward(pipe.store.keys.shard_of("metric-2"))
    client = create_app(pipe.store.settings, redis, pipe.store.queue_redis).test_client()
    families = {
        family.name: family.samples[0].value
        for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
        if "record" in family.name
        and family.name not in ("callstate_records", "callstate_record_workers_live")
    }
    assert families == {
        "callstate_records_forwarded": 1,
        "callstate_record_delivery_failures": 1,
        "callstate_records_dead_lettered": 0,
        "callstate_record_dead_letters": 0,
        "callstate_record_outbox_entries": 0,
        "callstate_record_deliveries_retrying": 1,
    }


def test_metrics_name_a_missing_retrier(
    pipeline_for: Any, receiver: Receiver, redis: Redis
) -> None:
    pipe = pipeline_for(receiver.url)
    client = create_app(pipe.store.settings, redis, pipe.store.queue_redis).test_client()

    def live() -> dict[str, float]:
        text = client.get("/metrics").get_data(as_text=True)
        [family] = [
            f
            for f in text_string_to_metric_families(text)
            if f.name == "callstate_record_workers_live"
        ]
        return {sample.labels["queue"]: sample.value for sample in family.samples}

    assert live() == {"forward": 0, "retries": 0}
    Worker([pipe.forwarder.queue], connection=pipe.store.queue_redis).register_birth()  # type: ignore[no-untyped-call]
    assert live() == {"forward": 1, "retries": 0}  # a failed delivery would never be retried
    Worker([pipe.forwarder.retry_queue], connection=pipe.store.queue_redis).register_birth()  # type: ignore[no-untyped-call]
    assert live() == {"forward": 1, "retries": 1}


def test_the_cli_redelivers_and_shows_the_figures(
    pipeline_for: Any,
    receiver: Receiver,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    receiver.behaviour = lambda n: FAIL
    pipe = pipeline_for(receiver.url)
    shard = pipe.apply(*a_call("cli-1"))
    pipe.forwarder.forward(shard)
    [job_id] = pipe.pending_jobs(shard)
    pipe.forwarder.deliver(shard, 1, job_id, 1)
    monkeypatch.setattr(cli, "connect", lambda url: redis)
    monkeypatch.setattr(cli, "connect_queue", lambda settings, data: pipe.store.queue_redis)
    monkeypatch.setattr(cli, "configure_logging", lambda log_format: None)
    monkeypatch.setenv("CALLSTATE_RECORD_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("CALLSTATE_RECORD_WEBHOOK_SECRET", SECRET)
    for name in ("CALLSTATE_SHARDS", "CALLSTATE_KEY_PREFIX", "LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)

    assert cli.main(["stats"]) == cli.OK
    shown = (
        "0 delivered, 2 failed attempts, 0 retrying, 0 in the outboxes, 1 dead-lettered (1 kept)"
    )
    assert shown in capsys.readouterr().out
    assert cli.main(["records", "redeliver"]) == cli.OK
    assert capsys.readouterr().out == "1 dead letters queued for delivery again\n"
    assert cli.main(["records", "redeliver", "--json"]) == cli.OK
    assert json.loads(capsys.readouterr().out) == {"queued": 0, "kept": 0}
    assert cli.main(["records", "--json"]) == cli.OK  # without a sub-command: the stream
    assert [item["call_id"] for item in json.loads(capsys.readouterr().out)] == ["cli-1"]
    assert cli.main(["stats", "--json"]) == cli.OK
    assert json.loads(capsys.readouterr().out)["forwarding"]["retrying"] == 1


def test_the_board_shows_forwarding_only_when_it_is_on(
    pipeline_for: Any, receiver: Receiver, redis: Redis, client: Any
) -> None:
    assert client.get("/board/state").get_json()["forwarding"] is None
    pipe = pipeline_for(receiver.url)
    pipe.forwarder.forward(pipe.apply(*a_call("board-1")))
    app = create_app(pipe.store.settings, redis, pipe.store.queue_redis)
    shown = app.test_client().get("/board/state").get_json()
    assert shown["forwarding"] == {
        "delivered": 1,
        "failed": 0,
        "dead_lettered": 0,
        "dead_letters": 0,
        "outbox": 0,
        "retrying": 0,
    }


def test_while_the_event_workers_are_behind_forwarding_yields(
    pipeline_for: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forwarding, "SLICE_SECONDS", 0.05)
    monkeypatch.setattr(forwarding, "YIELD_BATCH", 2)
    pipe = pipeline_for(receiver.url)
    shard = pipe.store.keys.shard_of("busy-0")
    calls = [f"busy-{n}" for n in range(40) if pipe.store.keys.shard_of(f"busy-{n}") == shard]
    for call_id in calls[:3]:
        pipe.apply(*a_call(call_id))
    pipe.store.redis.incrby(pipe.store.keys.logged_counter(1), forwarding.YIELD_BACKLOG + 1)
    assert pipe.forwarder.forward(shard) == 2  # then it rests, and wakes its successor
    assert receiver.accepted.ids == [f"{calls[0]}:1", f"{calls[1]}:1"]
    assert pipe.store.redis.get(pipe.store.keys.forward_wake(shard)) is not None
    pipe.store.redis.decrby(pipe.store.keys.logged_counter(1), forwarding.YIELD_BACKLOG + 1)
    assert pipe.forwarder.forward(shard) == 1


def test_maintenance_wakes_a_forwarder_whose_wake_was_lost(
    pipeline_for: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = pipeline_for(receiver.url)
    fwd: Forwarder = pipe.forwarder
    shard = pipe.apply(*a_call("lost-1"))
    assert fwd.wake_stuck() == 1  # an outbox with entries and no job queued
    first = fwd.wakes.holder(shard)
    assert first is not None and fwd.queue.get_job_position(first) is not None
    assert fwd.wake_stuck() == 0  # queued: nothing to do
    fwd.queue_redis.delete(fwd.queue.key)  # the job is lost (a worker died after taking it)
    monkeypatch.setattr(coordination, "LOST_WAKE_GRACE_MS", 0)
    assert fwd.wake_stuck() == 1
    second = fwd.wakes.holder(shard)
    assert second not in (None, first) and fwd.queue.get_job_position(second) is not None
    assert fwd.forward(shard, second) == 1
    assert fwd.wake_stuck() == 0  # the outbox is empty
