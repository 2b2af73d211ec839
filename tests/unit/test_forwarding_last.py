"""Review of the last forwarding changes: packed outbox entries (one packing per revision for
the history and the outbox) and the delivery jobs' own queue, across an upgrade."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

from redis import Redis
from rq.job import Job
from rq.worker import SimpleWorker

from callstate import forwarding
from callstate.codec import unpack
from callstate.connection import StreamRows, text
from callstate.delivery import Destination, Outcome
from callstate.forwarding import Pending
from callstate.machine import CallMachine
from tests.factories import body, published
from tests.receiver import Receiver
from tests.unit.test_forwarding import SECRET, Pipeline, a_call, forwarding_settings


def test_two_revisions_in_one_batch_each_send_their_own_published_bytes(
    redis: Redis, tmp_path: Path, machine: CallMachine
) -> None:
    with Receiver(SECRET) as receiver:
        pipe = Pipeline(redis, forwarding_settings(tmp_path, receiver.url), machine)
        shard = 0
        notice = {"type": "recording", "call_id": "fwd-batch", "recording_url": "https://r/1.mp3"}
        for payload in [*a_call("fwd-batch"), notice]:  # all logged, then applied in one commit
            _, shard, _ = pipe.store.log.append_event(payload["call_id"], body(payload))
        pipe.drainer.drain(shard)
        records = published(redis, pipe.store.keys)
        outbox = cast(StreamRows, redis.xrange(pipe.store.keys.outbox(shard)))
        in_stream = [fields[b"record"] for _, fields in records]
        owed = [unpack(fields[b"record"]) for _, fields in outbox]
        assert len(in_stream) == 2 and owed == in_stream
        assert [json.loads(raw)["revision"] for raw in owed] == [1, 2]
        stored = cast(bytes | None, redis.hget(pipe.store.keys.history(shard), "fwd-batch"))
        assert stored is not None and unpack(stored) == in_stream[-1]
        sent: list[bytes] = []
        send = pipe.forwarder.sender.send

        def recording(destination: Destination, message_id: str, text_body: str) -> Outcome:
            sent.append(text_body.encode())
            return send(destination, message_id, text_body)

        pipe.forwarder.sender.send = recording  # type: ignore[method-assign,assignment]
        assert pipe.forwarder.forward(shard) == 2
        assert sent == in_stream  # signatures are over these very bytes
        assert receiver.accepted.ids == ["fwd-batch:1", "fwd-batch:2"]


def test_an_outbox_entry_written_plain_before_the_upgrade_is_still_delivered(
    redis: Redis, tmp_path: Path, machine: CallMachine
) -> None:
    with Receiver(SECRET) as receiver:
        pipe = Pipeline(redis, forwarding_settings(tmp_path, receiver.url), machine)
        record = json.dumps({"call_id": "old-1", "revision": 1, "note": "caf\u00e9"})
        shard = pipe.store.keys.shard_of("old-1")
        fields = {"call_id": "old-1", "revision": "1", "record": record}
        redis.xadd(pipe.store.keys.outbox(shard), fields)  # type: ignore[arg-type]
        assert pipe.forwarder.forward(shard) == 1
        assert receiver.accepted.bodies["old-1:1"]["note"] == "caf\u00e9"


def test_delivery_jobs_queued_on_the_forward_queue_by_the_old_version_still_run_in_order(
    redis: Redis, tmp_path: Path, machine: CallMachine
) -> None:
    """Jobs the previous version queued on the forward queue run on the forwarder; a later
    revision chained behind one moves to the retries' queue when it ends."""
    with Receiver(SECRET) as receiver:
        settings = forwarding_settings(tmp_path, receiver.url)
        fwd = forwarding.configure(settings, redis)
        destination = next(iter(fwd.destinations))
        shard = fwd.keys.shard_of("up-1")
        record = [json.dumps({"call_id": "up-1", "revision": n}) for n in (1, 2)]
        first, second = (Pending(destination, "up-1", n, record[n - 1]) for n in (1, 2))
        fwd.retry_queue, new_queue = fwd.queue, fwd.retry_queue  # the old version's queueing
        with redis.pipeline() as tx:
            old_job = fwd.enqueue_delivery(tx, shard, first, None, 0, 0)
            tx.execute()
        fwd.retry_queue = new_queue
        with redis.pipeline() as tx:
            new_job = fwd.enqueue_delivery(tx, shard, second, old_job, 0, 0)
            tx.execute()
        assert Job.fetch(new_job, connection=redis).get_status().value == "deferred"
        SimpleWorker([fwd.queue], connection=redis).work(burst=True)
        assert receiver.accepted.ids == ["up-1:1"]
        assert Job.fetch(new_job, connection=redis).origin == settings.record_retry_queue_name
        SimpleWorker([fwd.retry_queue], connection=redis).work(burst=True)
        assert receiver.accepted.ids == ["up-1:1", "up-1:2"]
        assert redis.hlen(fwd.keys.forward_pending(shard)) == 0
        assert text(redis.hget(fwd.keys.forward_counters(shard), "delivered") or b"0") == "2"
