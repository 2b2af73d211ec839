"""What metrics cost: the same measure taken with CALLSTATE_METRICS on (and `/metrics` scraped
as Prometheus would) and off, alternated so that the machine's drift hits both alike."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import requests

from bench.load import percentiles

MODES = ("on", "off")


def alternating(rounds: int) -> list[str]:
    """on, off, off, on, on, off, ...: each mode as often first as second (ABBA)."""
    order: list[str] = []
    for n in range(rounds):
        order += list(MODES) if n % 2 == 0 else list(reversed(MODES))
    return order


def compare(runs: list[tuple[str, float]]) -> dict[str, Any]:
    """Each mode's values and median, and the ratio of the medians (on / off)."""
    by_mode = {mode: [value for m, value in runs if m == mode] for mode in MODES}
    medians = {mode: statistics.median(values) for mode, values in by_mode.items()}
    return {
        "order": [mode for mode, _ in runs],
        **{mode: {"runs": by_mode[mode], "median": medians[mode]} for mode in MODES},
        "ratio": medians["on"] / medians["off"],
    }


class Scraper:
    """Scrapes `/metrics` every `interval` seconds in a thread, as a Prometheus server would."""

    def __init__(self, web_url: str, interval: float) -> None:
        self.url = f"{web_url}/metrics"
        self.interval = interval
        self.latencies_ms: list[float] = []
        self.failures = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stopping.is_set():
                started = time.monotonic()
                response = session.get(self.url, timeout=10)
                self.latencies_ms.append((time.monotonic() - started) * 1000)
                self.failures += response.status_code != 200
                self.stopping.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def summary(self) -> dict[str, Any]:
        return {"failures": self.failures, "latency_ms": percentiles(self.latencies_ms)}
