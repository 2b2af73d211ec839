"""What the guarantees assume of a Redis server, checked against a live one.

callstate acknowledges an event once Redis has it; that promise only holds if Redis keeps what
it acknowledged (append-only file, fsync policy) and refuses writes rather than evicting data
when full. `callstate doctor` and every process's start-up check a server against this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from callstate.connection import every_server

log = logging.getLogger(__name__)
SAFE_FSYNC = ("always", "everysec")


@dataclass(frozen=True)
class Finding:
    """One setting: what it is on the server, what the guarantees need, and whether it holds."""

    setting: str
    found: str
    needed: str
    ok: bool
    why: str


def examine(redis: Redis) -> list[Finding]:
    """Read the server's settings (INFO, and CONFIG where the server allows it) and judge each;
    on a cluster, every node's: a setting holds when it holds on each, and shows each value,
    and a node that does not answer is a finding of its own (with none answering, it raises)."""
    servers = every_server(redis)
    found, silent = [], []
    for server in servers:
        try:
            found.append(_examine_server(server))
        except (RedisConnectionError, RedisTimeoutError):
            if len(servers) == 1:
                raise
            silent.append(_address(server))
    if not found:
        raise RedisConnectionError(f"no node answers: {', '.join(silent)}")
    judged = [
        Finding(
            each[0].setting,
            ", ".join(sorted({finding.found for finding in each})),
            each[0].needed,
            all(finding.ok for finding in each),
            next((finding.why for finding in each if not finding.ok), each[0].why),
        )
        for each in zip(*found, strict=True)
    ]
    if silent:
        judged.append(
            Finding(
                "nodes answering",
                f"{len(found)} of {len(servers)} ({', '.join(silent)} not)",
                "all",
                False,
                "a node that does not answer is not judged; a primary down leaves its shards' "
                "events answered 503 until its replica is promoted",
            )
        )
    return judged


def _address(server: Redis) -> str:
    options = server.connection_pool.connection_kwargs
    return f"{options.get('host')}:{options.get('port')}"


def _examine_server(redis: Redis) -> list[Finding]:
    persistence = _info(redis, "persistence")
    memory = _info(redis, "memory")
    aof = str(persistence.get("aof_enabled", "unknown"))
    policy = str(memory.get("maxmemory_policy", "unknown"))
    fsync = _config(redis, "appendfsync")
    return [
        Finding(
            "appendonly",
            {"1": "yes", "0": "no"}.get(aof, aof),
            "yes",
            aof == "1",
            "without the append-only file a restart loses every acknowledged event since the "
            "last snapshot",
        ),
        Finding(
            "appendfsync",
            fsync,
            " or ".join(SAFE_FSYNC),
            fsync in SAFE_FSYNC,
            "with 'no' the operating system decides when acknowledged events reach the disk"
            if fsync != "unknown"
            else "CONFIG is not allowed on this server: check the fsync policy by hand",
        ),
        Finding(
            "maxmemory-policy",
            policy,
            "noeviction",
            policy == "noeviction",
            "any other policy lets a full Redis evict logged events, documents or queued jobs",
        ),
    ]


def warn_if_unsafe(redis: Redis) -> None:
    """Log, once, each setting that breaks a guarantee; never stop the process for it."""
    try:
        findings = examine(redis)
    except RedisError as exc:
        log.warning("could not check the Redis server's settings: %s", exc)
        return
    for finding in findings:
        if not finding.ok:
            log.warning(
                "Redis %s is %s, the guarantees need %s: %s",
                finding.setting,
                finding.found,
                finding.needed,
                finding.why,
            )


def _info(redis: Redis, section: str) -> dict[str, Any]:
    """An INFO section; empty (so every setting reads `unknown`) where the server refuses it,
    as a proxy or an ACL user without INFO does. A server that cannot be reached still raises."""
    try:
        found: dict[str, Any] = redis.info(section)
    except ResponseError:
        return {}
    return found


def _config(redis: Redis, name: str) -> str:
    try:
        found = cast(dict[Any, Any], redis.config_get(name))
    except RedisError:
        return "unknown"
    value = found.get(name) or found.get(name.encode())
    return value.decode() if isinstance(value, bytes) else str(value or "unknown")
