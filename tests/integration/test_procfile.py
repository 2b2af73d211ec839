"""The Procfile as `make run` starts it: embedded Redis, web, workers and scheduler."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import requests

from tests.factories import body, ended, event
from tests.integration.stack import BIN, REPO, free_port, wait_until


def test_procfile_runs_the_whole_service_on_the_embedded_redis(tmp_path: Path) -> None:
    web_port, redis_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "CALLSTATE_VAR_DIR": str(tmp_path / "var"),
        "CALLSTATE_REDIS_PORT": str(redis_port),
    }
    log = (tmp_path / "honcho.log").open("wb")
    honcho = subprocess.Popen(
        [str(BIN / "honcho"), "start", "--procfile", "Procfile", "--port", str(web_port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{web_port}"
    headers = {"Content-Type": "application/json"}
    try:

        def stored() -> bool:
            try:
                payload = event("procfile-1", "ringing", 1)
                return requests.post(
                    f"{url}/webhooks/stringee", data=body(payload), headers=headers, timeout=2
                ).ok
            except requests.ConnectionError:
                return False

        wait_until(stored, 60, "the Procfile's web process to store an event")
        end = body(ended("procfile-1", 2, "486 Busy Here", 0))
        assert requests.post(f"{url}/webhooks/stringee", data=end, headers=headers, timeout=5).ok

        def record() -> dict[str, object] | None:
            response = requests.get(f"{url}/calls/procfile-1/record", timeout=2)
            return response.json() if response.ok else None

        found = wait_until(record, 60, "the Procfile's worker to produce the record")
        assert found["disposition"] == "busy"
        assert (tmp_path / "var").is_dir()
        # Readiness and metrics with nothing set up by hand: gunicorn.conf.py made the directory.
        wait_until(lambda: requests.get(f"{url}/readyz", timeout=2).ok, 30, "/readyz to be 200")
        assert "callstate_http_requests_total" in requests.get(f"{url}/metrics", timeout=5).text
        assert any((tmp_path / "var" / "prometheus").glob("counter_*.db"))
        assert any((tmp_path / "var").rglob("appendonly*"))
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        honcho.wait(timeout=30)
        print((tmp_path / "honcho.log").read_text(errors="replace")[-4000:])
