"""callstate's Redis data, one module per family; a Store holds one of each over one client."""

from __future__ import annotations

from redis import Redis

from callstate.config import Settings
from callstate.coordination import DrainCoordination
from callstate.documents import Documents
from callstate.eventlog import EventLog
from callstate.keys import Keys
from callstate.quarantine import Quarantine


class Store:
    """The event log, drain coordination, call documents, records history and quarantine of one
    deployment, and the client of the Redis that holds its RQ queues (`queue_redis`: the data
    Redis unless CALLSTATE_QUEUE_URL or CALLSTATE_QUEUE_SENTINEL_MASTER names another)."""

    def __init__(self, redis: Redis, settings: Settings, queue_redis: Redis | None = None) -> None:
        self.redis = redis
        self.queue_redis = queue_redis or redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.shards)
        self.log = EventLog(redis, settings)
        self.coordination = DrainCoordination(redis, settings)
        self.docs = Documents(redis, settings)
        self.history = self.docs.history
        self.quarantine = Quarantine(redis, settings)
