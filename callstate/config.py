"""Settings, read from the environment in this one place and passed down to every part."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from standardwebhooks import Webhook

EMBEDDED_REDIS_PORT = 6390
FSYNC_POLICIES = ("always", "everysec")
LOG_FORMATS = ("text", "json")
SWITCH = ("on", "off")


# A batch's commit is one Lua script, and Redis' Lua passes at most ~8,000 arguments to one
# command: the largest write of a batch (the history's HSET, two per record) stays far below.
MAX_DRAIN_BATCH = 2000
# A drain job's blocking read waits at most a slice: it must end before the client's socket
# timeout (callstate/connection.py, 5 s).
MAX_DRAIN_SLICE_MS = 4000
# WAIT blocks the webhook's Redis command: its timeout must end before the client's socket
# timeout (connection.REDIS_TIMEOUT_SECONDS) would, which would answer 503 without the reason.
MAX_REPLICA_ACK_TIMEOUT_MS = 4000


@dataclass(frozen=True)
class Limits:
    """How large one call may grow: journaled events, bytes received, record revisions."""

    max_events: int
    max_call_bytes: int
    max_revisions: int


# Real calls have fewer than 50 events of about 500 bytes, and a few record revisions.
DEFAULT_LIMITS = Limits(max_events=500, max_call_bytes=512 * 1024, max_revisions=20)


@dataclass(frozen=True)
class Settings:
    """Everything the web, the workers, the scheduler and the CLI need to agree on."""

    redis_url: str
    embedded_redis: bool
    var_dir: Path
    # Sentinel (`host:port` each) and the name they watch the primary under, instead of a URL.
    sentinels: tuple[str, ...] = ()
    sentinel_master: str | None = None
    # RQ's queues on a Redis of their own (a URL, or a primary the same sentinels watch); unset,
    # they share the data Redis.
    queue_url: str | None = None
    queue_sentinel_master: str | None = None
    # Redis Cluster nodes (`host:port` each) for the data, instead of a URL or sentinels.
    cluster_nodes: tuple[str, ...] = ()
    signing_secret: str | None = None
    signing_secret_previous: str | None = None
    project_secrets: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    account_sids: frozenset[str] = frozenset()
    project_ids: frozenset[int] = frozenset()
    api_token: str | None = None
    host: str = "127.0.0.1"
    max_body_bytes: int = 64 * 1024
    shards: int = 4
    queue_name: str = "callstate"
    key_prefix: str = "cs"
    drain_batch: int = 500
    drain_lock_seconds: int = 30
    drain_slice_ms: int = 250
    drain_linger_ms: int = 1000
    drain_window_ms: int = 0
    stale_after_seconds: int = 4 * 3600
    maintenance_interval_seconds: int = 10
    retention_seconds: int = 7 * 24 * 3600
    snapshot_interval_seconds: int = 3600
    records_stream_maxlen: int = 1_000_000
    # A month's invoice and a month to dispute it, with a month to spare; see README for memory.
    record_retention_days: int = 90
    quarantine_max: int = 1000
    board_streams: int = 2
    board_stream_seconds: int = 60
    max_clock_skew_seconds: int = 600
    fsync: str = "always"
    # Replicas that must confirm an event before the webhook acknowledges it (Redis WAIT).
    replica_acks: int = 0
    replica_ack_timeout_ms: int = 1000
    log_format: str = "text"
    # gunicorn's line per request cost ~14% of the web's CPU per webhook: wanted only sometimes.
    access_log: bool = False
    max_events_per_call: int = DEFAULT_LIMITS.max_events
    max_call_bytes: int = DEFAULT_LIMITS.max_call_bytes
    max_record_revisions: int = DEFAULT_LIMITS.max_revisions
    # A shard whose oldest unapplied entry is older than this makes `/readyz` answer 503.
    ready_max_lag_seconds: int = 30
    metrics: bool = True
    multiproc_dir: Path | None = None
    # Record forwarding (callstate/forwarding.py): off while no URL is set.
    record_webhook_urls: tuple[str, ...] = ()
    record_webhook_secret: str | None = None
    record_queue_name: str = "callstate-records"
    record_webhook_timeout_seconds: int = 5
    record_retry_first_seconds: int = 10
    record_retry_total_seconds: int = 24 * 3600

    @property
    def record_retry_queue_name(self) -> str:
        """The delivery jobs' own queue, worked by its own process: a receiver that times out
        on every attempt then holds up its own retries only, never the forward jobs that send
        every receiver's new revisions."""
        return f"{self.record_queue_name}-retries"

    @property
    def metrics_dir(self) -> Path:
        """Where gunicorn's processes keep their HTTP figures for `/metrics` to add up:
        PROMETHEUS_MULTIPROC_DIR when given, else a directory of the var dir."""
        return self.multiproc_dir or self.var_dir / "prometheus"

    @property
    def forwarding(self) -> bool:
        """Whether record revisions are forwarded to HTTP receivers."""
        return bool(self.record_webhook_urls)

    @property
    def call_limits(self) -> Limits:
        return Limits(self.max_events_per_call, self.max_call_bytes, self.max_record_revisions)

    @property
    def signing_secrets(self) -> tuple[str, ...]:
        """The deployment-wide signing secrets: during a rotation, two."""
        return tuple(s for s in (self.signing_secret, self.signing_secret_previous) if s)

    @property
    def signers(self) -> dict[int | None, tuple[str, ...]]:
        """Every secret a webhook may be signed with, by project (None: any project)."""
        found: dict[int | None, tuple[str, ...]] = {p: s for p, s in self.project_secrets.items()}
        if self.signing_secrets:
            found[None] = self.signing_secrets
        return found

    @property
    def exposed(self) -> bool:
        """Whether the web is bound beyond loopback, where others can reach it."""
        return not ipaddress.ip_address(_bind_address(self.host)).is_loopback

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables; unset ones take the defaults above."""
        env = os.environ if env is None else env
        var_dir = Path(env.get("CALLSTATE_VAR_DIR", "var")).resolve()
        url = env.get("REDIS_URL", "")
        embedded_port = _int(env, "CALLSTATE_REDIS_PORT", EMBEDDED_REDIS_PORT)
        sentinels, sentinel_master = _sentinels(env)
        cluster_nodes = _addresses(env, "CALLSTATE_REDIS_CLUSTER_NODES")
        if sum(map(bool, (url, sentinels, cluster_nodes))) > 1:
            raise ValueError(
                "set one of REDIS_URL, REDIS_SENTINELS and CALLSTATE_REDIS_CLUSTER_NODES"
            )
        queue_url, queue_master = _queue_server(env, sentinels)
        if cluster_nodes and queue_url is None:
            # RQ cannot run on a cluster: its commands span slots (rq issues 1942, 2050).
            raise ValueError("CALLSTATE_REDIS_CLUSTER_NODES is set: CALLSTATE_QUEUE_URL too")
        return _checked(
            cls(
                redis_url=url or f"redis://127.0.0.1:{embedded_port}/0",
                embedded_redis=not (url or sentinels or cluster_nodes),
                var_dir=var_dir,
                sentinels=sentinels,
                sentinel_master=sentinel_master,
                queue_url=queue_url,
                queue_sentinel_master=queue_master,
                cluster_nodes=cluster_nodes,
                signing_secret=env.get("STRINGEE_SIGNING_SECRET") or None,
                signing_secret_previous=env.get("STRINGEE_SIGNING_SECRET_PREVIOUS") or None,
                project_secrets=_project_secrets(env.get("STRINGEE_SIGNING_SECRETS", "")),
                account_sids=frozenset(_items(env.get("CALLSTATE_ACCOUNT_SIDS", ""))),
                project_ids=frozenset(
                    _project_id("CALLSTATE_PROJECT_IDS", item)
                    for item in _items(env.get("CALLSTATE_PROJECT_IDS", ""))
                ),
                host=env.get("HOST") or cls.host,
                api_token=env.get("CALLSTATE_API_TOKEN") or None,
                max_body_bytes=_int(env, "CALLSTATE_MAX_BODY_BYTES", cls.max_body_bytes),
                shards=_int(env, "CALLSTATE_SHARDS", cls.shards),
                queue_name=env.get("CALLSTATE_QUEUE", cls.queue_name),
                key_prefix=env.get("CALLSTATE_KEY_PREFIX", cls.key_prefix),
                drain_batch=_int(
                    env, "CALLSTATE_DRAIN_BATCH", cls.drain_batch, most=MAX_DRAIN_BATCH
                ),
                drain_lock_seconds=_int(
                    env, "CALLSTATE_DRAIN_LOCK_SECONDS", cls.drain_lock_seconds
                ),
                drain_slice_ms=_int(
                    env, "CALLSTATE_DRAIN_SLICE_MS", cls.drain_slice_ms, most=MAX_DRAIN_SLICE_MS
                ),
                drain_linger_ms=_int(env, "CALLSTATE_DRAIN_LINGER_MS", cls.drain_linger_ms),
                drain_window_ms=_int(
                    env, "CALLSTATE_DRAIN_WINDOW_MS", cls.drain_window_ms, least=0
                ),
                stale_after_seconds=_int(
                    env, "CALLSTATE_STALE_AFTER_SECONDS", cls.stale_after_seconds
                ),
                maintenance_interval_seconds=_int(
                    env, "CALLSTATE_MAINTENANCE_INTERVAL_SECONDS", cls.maintenance_interval_seconds
                ),
                retention_seconds=_int(env, "CALLSTATE_RETENTION_SECONDS", cls.retention_seconds),
                snapshot_interval_seconds=_int(
                    env, "CALLSTATE_SNAPSHOT_INTERVAL_SECONDS", cls.snapshot_interval_seconds
                ),
                records_stream_maxlen=_int(
                    env, "CALLSTATE_RECORDS_STREAM_MAXLEN", cls.records_stream_maxlen
                ),
                record_retention_days=_int(
                    env, "CALLSTATE_RECORD_RETENTION_DAYS", cls.record_retention_days
                ),
                quarantine_max=_int(env, "CALLSTATE_QUARANTINE_MAX", cls.quarantine_max),
                board_streams=_int(env, "CALLSTATE_BOARD_STREAMS", cls.board_streams),
                board_stream_seconds=_int(
                    env, "CALLSTATE_BOARD_STREAM_SECONDS", cls.board_stream_seconds
                ),
                max_clock_skew_seconds=_int(
                    env, "CALLSTATE_MAX_CLOCK_SKEW_SECONDS", cls.max_clock_skew_seconds
                ),
                fsync=_choice(env, "CALLSTATE_FSYNC", FSYNC_POLICIES, cls.fsync),
                replica_acks=_int(env, "CALLSTATE_REPLICA_ACKS", cls.replica_acks, least=0),
                replica_ack_timeout_ms=_int(
                    env,
                    "CALLSTATE_REPLICA_ACK_TIMEOUT_MS",
                    cls.replica_ack_timeout_ms,
                    most=MAX_REPLICA_ACK_TIMEOUT_MS,
                ),
                log_format=_choice(env, "LOG_FORMAT", LOG_FORMATS, cls.log_format),
                access_log=_choice(env, "CALLSTATE_ACCESS_LOG", SWITCH, "off") == "on",
                max_events_per_call=_int(
                    env, "CALLSTATE_MAX_EVENTS_PER_CALL", cls.max_events_per_call
                ),
                max_call_bytes=_int(env, "CALLSTATE_MAX_CALL_BYTES", cls.max_call_bytes),
                max_record_revisions=_int(
                    env, "CALLSTATE_MAX_RECORD_REVISIONS", cls.max_record_revisions
                ),
                ready_max_lag_seconds=_int(
                    env, "CALLSTATE_READY_MAX_LAG_SECONDS", cls.ready_max_lag_seconds
                ),
                metrics=_choice(env, "CALLSTATE_METRICS", SWITCH, "on") == "on",
                multiproc_dir=_path(env.get("PROMETHEUS_MULTIPROC_DIR")),
                **_forwarding(env),
            )
        )


def _checked(settings: Settings) -> Settings:
    if settings.snapshot_interval_seconds >= settings.retention_seconds:
        raise ValueError(
            "CALLSTATE_SNAPSHOT_INTERVAL_SECONDS must be shorter than CALLSTATE_RETENTION_SECONDS"
        )
    return settings


def _forwarding(env: Mapping[str, str]) -> dict[str, Any]:
    """The record forwarding settings, checked: http(s) URLs only, and a `whsec_` secret that
    Standard Webhooks can sign with whenever a URL is set."""
    urls = tuple(_webhook_url(item) for item in _items(env.get("CALLSTATE_RECORD_WEBHOOK_URL", "")))
    secret = env.get("CALLSTATE_RECORD_WEBHOOK_SECRET") or None
    if urls and secret is None:
        raise ValueError("CALLSTATE_RECORD_WEBHOOK_URL is set: CALLSTATE_RECORD_WEBHOOK_SECRET too")
    if secret is not None:
        _check_webhook_secret(secret)
    defaults = Settings
    return {
        "record_webhook_urls": urls,
        "record_webhook_secret": secret,
        "record_queue_name": env.get("CALLSTATE_RECORD_QUEUE") or defaults.record_queue_name,
        "record_webhook_timeout_seconds": _int(
            env, "CALLSTATE_RECORD_WEBHOOK_TIMEOUT_SECONDS", defaults.record_webhook_timeout_seconds
        ),
        "record_retry_first_seconds": _int(
            env, "CALLSTATE_RECORD_RETRY_FIRST_SECONDS", defaults.record_retry_first_seconds
        ),
        "record_retry_total_seconds": _int(
            env, "CALLSTATE_RECORD_RETRY_TOTAL_SECONDS", defaults.record_retry_total_seconds
        ),
    }


def _sentinels(env: Mapping[str, str]) -> tuple[tuple[str, ...], str | None]:
    """REDIS_SENTINELS as `host:port` items (`[v6 address]:port` too), checked, and the
    REDIS_SENTINEL_MASTER that goes with them: one without the other is a mistake, not a
    reason to fall back to the embedded Redis."""
    items = _addresses(env, "REDIS_SENTINELS")
    master = env.get("REDIS_SENTINEL_MASTER") or None
    if items and master is None:
        raise ValueError("REDIS_SENTINELS is set: REDIS_SENTINEL_MASTER too")
    if master is not None and not items:
        raise ValueError("REDIS_SENTINEL_MASTER is set: REDIS_SENTINELS too (host:port,...)")
    return items, master


def _addresses(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A list of servers as `host:port` items (`[v6 address]:port` too), checked."""
    items = tuple(_items(env.get(name, "")))
    for item in items:
        host, port = server_address(item)
        if not host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{name} must be host:port items, got {item!r}")
    return items


def _queue_server(
    env: Mapping[str, str], sentinels: tuple[str, ...]
) -> tuple[str | None, str | None]:
    """CALLSTATE_QUEUE_URL or CALLSTATE_QUEUE_SENTINEL_MASTER (a primary that REDIS_SENTINELS
    watch too), at most one of them."""
    url = env.get("CALLSTATE_QUEUE_URL") or None
    master = env.get("CALLSTATE_QUEUE_SENTINEL_MASTER") or None
    if url is not None and master is not None:
        raise ValueError("set CALLSTATE_QUEUE_URL or CALLSTATE_QUEUE_SENTINEL_MASTER, not both")
    if master is not None and not sentinels:
        raise ValueError("CALLSTATE_QUEUE_SENTINEL_MASTER is set: REDIS_SENTINELS too")
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("CALLSTATE_QUEUE_URL must be a redis://, rediss:// or unix:// URL")
    return url, master


def server_address(item: str) -> tuple[str, str]:
    """A `host:port` item's host (an IPv6 address without its brackets) and port."""
    host, _, port = item.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def _webhook_url(raw: str) -> str:
    """A receiver's URL: http or https with a host, no whitespace in it and no user or password
    (the sender would drop them); the message never repeats it (a URL may carry a token)."""
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or "@" in parts.netloc
        or any(c.isspace() for c in parts.netloc)
    ):
        raise ValueError(
            "CALLSTATE_RECORD_WEBHOOK_URL holds comma-separated http:// or https:// URLs "
            "with a host and no user or password"
        )
    return raw


def _check_webhook_secret(secret: str) -> None:
    problem = (
        "CALLSTATE_RECORD_WEBHOOK_SECRET must be a Standard Webhooks secret: whsec_ and base64"
    )
    if not secret.startswith("whsec_"):
        raise ValueError(problem)
    try:
        Webhook(secret)
    except Exception:  # the library raises binascii.Error or its own for a bad or empty key
        raise ValueError(problem) from None


def _int(
    env: Mapping[str, str], name: str, default: int, least: int = 1, most: int | None = None
) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < least:
        qualifier = "positive" if least == 1 else f"at least {least}"
        raise ValueError(f"{name} must be {qualifier}, got {value}")
    if most is not None and value > most:
        raise ValueError(f"{name} must be at most {most}, got {value}")
    return value


def _items(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _project_id(name: str, raw: str) -> int:
    if not raw.isdigit():
        raise ValueError(f"{name}: project ids are integers, got {raw!r}")
    return int(raw)


def _project_secrets(raw: str) -> dict[int, tuple[str, ...]]:
    """`STRINGEE_SIGNING_SECRETS`: comma-separated `project_id:secret` pairs; a project named
    twice has two secrets, as during a rotation."""
    found: dict[int, tuple[str, ...]] = {}
    for item in _items(raw):
        project, _, secret = item.partition(":")
        if not secret or secret != secret.strip():
            raise ValueError("STRINGEE_SIGNING_SECRETS holds project_id:secret pairs")
        key = _project_id("STRINGEE_SIGNING_SECRETS", project.strip())
        found[key] = (*found.get(key, ()), secret)
    return found


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = env.get(name) or default
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _path(raw: str | None) -> Path | None:
    return Path(raw).resolve() if raw else None


def _bind_address(host: str) -> str:
    """The address a host name binds to, as far as it can be told without DNS."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0"  # noqa: S104 - a name we do not resolve counts as reachable
    return host
