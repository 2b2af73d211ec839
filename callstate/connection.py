"""The Redis client every process uses, and the reply helpers shared by the data modules."""

from __future__ import annotations

from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

REDIS_TIMEOUT_SECONDS = 5
# redis-py types replies as bytes-or-str (it cannot know decode_responses); RQ needs bytes.
StreamRows = list[tuple[bytes, dict[bytes, bytes]]]


def text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def connect(url: str) -> Redis:
    """A client that fails fast: redis-py's default retries back off for seconds, and a webhook
    that cannot store an event must answer 503 before the provider gives up on it.

    One immediate retry on a broken connection (a restarted server), none on a timeout: a
    command that timed out may have run, and an append run twice would log the event twice.
    """
    retry = Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,))
    return Redis.from_url(
        url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=2, retry=retry
    )
