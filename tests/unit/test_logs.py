"""The log format of every process: readable text, or JSON with the ids as fields."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

import pytest

from callstate.config import Settings
from callstate.drain import Drainer
from callstate.logs import make_formatter
from callstate.store import Store
from callstate.web import create_app
from tests.factories import body, event
from tests.integration.stack import REPO, free_port


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("callstate.drain", logging.ERROR, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_json_gives_one_object_per_line_with_the_ids_as_fields() -> None:
    line = make_formatter("json").format(
        record("shard %s: entry %s set aside", 3, "17-0", call_id="c-1", shard=3, log_id="17-0")
    )
    assert "\n" not in line
    found = json.loads(line)
    assert found.pop("time").endswith("+00:00")
    assert isinstance(found.pop("process"), int)
    assert found == {
        "level": "ERROR",
        "logger": "callstate.drain",
        "message": "shard 3: entry 17-0 set aside",
        "call_id": "c-1",
        "shard": 3,
        "log_id": "17-0",
    }


def test_json_keeps_a_traceback_on_its_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    found = json.loads(make_formatter("json").format(failed))
    assert "ValueError: boom" in found["exc_info"]


def test_text_stays_readable() -> None:
    line = make_formatter("text").format(record("shard %s: stopping", 3, shard=3))
    assert line.endswith(" ERROR callstate.drain: shard 3: stopping")
    assert "{" not in line


def test_the_drainer_names_the_entry_it_set_aside_in_fields(
    store: Store, drainer: Drainer, caplog: pytest.LogCaptureFixture
) -> None:
    shard = store.keys.shard_of("c-9")
    added = store.redis.xadd(store.keys.log(shard), {"call_id": "c-9", "event": b"\x01junk"})
    log_id = added.decode() if isinstance(added, bytes) else added
    with caplog.at_level("ERROR"):
        drainer.drain(shard)
    [line] = [make_formatter("json").format(r) for r in caplog.records if r.levelname == "ERROR"]
    fields = json.loads(line)
    assert (fields["call_id"], fields["shard"], fields["log_id"]) == ("c-9", shard, log_id)


def test_the_webhook_names_the_call_it_could_not_store(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = create_app(down).test_client()
    with caplog.at_level("WARNING", logger="callstate.webhook"):
        sent = client.post(
            "/webhooks/stringee",
            data=body(event("c-down", "ringing", 1)),
            content_type="application/json",
        )
    assert sent.status_code == 503
    [stored] = [r for r in caplog.records if r.name == "callstate.webhook"]
    assert json.loads(make_formatter("json").format(stored))["call_id"] == "c-down"
    assert "84909985668" not in caplog.text


# As in a worker: RQ is imported (setting its loggers' levels) before logging is configured.
CONFIGURED = """
import logging, warnings
import rq.cron, rq.worker
from callstate.logs import configure_logging
configure_logging("json")
logging.getLogger("callstate.drain").info("applied", extra={"shard": 2})
logging.getLogger("rq.cron").info("Enqueued job maintain to queue callstate")
logging.getLogger("rq.worker").info("callstate: Job OK (abc)")
logging.getLogger("transitions.core").info("Executed callback")
logging.getLogger("rq.worker").warning("job failed")
warnings.warn("deprecated", DeprecationWarning, stacklevel=1)
"""


def test_a_configured_process_writes_json_only_and_keeps_rq_to_its_warnings() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", CONFIGURED],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout == ""
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("callstate.drain", "INFO"),
        ("rq.worker", "WARNING"),
        ("py.warnings", "WARNING"),
    ]
    assert lines[0]["shard"] == 2


def test_the_log_format_is_a_checked_setting() -> None:
    assert Settings.from_env({}).log_format == "text"
    assert Settings.from_env({"LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ValueError, match="LOG_FORMAT must be one of text, json"):
        Settings.from_env({"LOG_FORMAT": "JSON"})
