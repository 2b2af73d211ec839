"""The quarantine: bounded, newest first."""

from __future__ import annotations

import dataclasses

from redis import Redis

from callstate.config import Settings
from callstate.store import Store


def test_the_quarantine_keeps_the_newest_and_shows_as_many_as_asked(
    redis: Redis, settings: Settings
) -> None:
    store = Store(redis, dataclasses.replace(settings, quarantine_max=5))
    for n in range(8):
        store.quarantine.add({"n": n})
    assert [item["n"] for item in store.quarantine.recent(3)] == [7, 6, 5]
    assert [item["n"] for item in store.quarantine.recent(100)] == [7, 6, 5, 4, 3]
