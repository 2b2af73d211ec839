"""The quarantine: deliveries refused or set aside, kept for an operator to inspect."""

from __future__ import annotations

import json
import logging
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from callstate.config import Settings
from callstate.keys import Keys

log = logging.getLogger(__name__)


class Quarantine:
    """A bounded list of refused deliveries, newest first."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.shards)

    def add(self, item: dict[str, Any]) -> None:
        """Keep a rejected delivery for inspection; best effort, the list is bounded."""
        try:
            # No MULTI: the list and its counter are two global keys, in two hash slots on a
            # cluster, where a transaction across them is refused.
            pipe = self.redis.pipeline(transaction=False)
            # ASCII escapes: a rejected body's text may not even be encodable as UTF-8.
            pipe.lpush(self.keys.quarantine(), json.dumps(item))
            pipe.ltrim(self.keys.quarantine(), 0, self.settings.quarantine_max - 1)
            pipe.incr(self.keys.quarantined_counter())
            pipe.execute()
        except RedisError as exc:
            log.warning("rejected delivery not quarantined: %s", exc)

    def recent(self, limit: int) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.redis.lrange(self.keys.quarantine(), 0, limit - 1)]
