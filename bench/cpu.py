"""CPU time per role (web, workers, Redis, the load generator) over a phase, from /proc: the
figure by which the next change to the hot path is judged (ms of CPU per event)."""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def group_cpu_seconds(group: int) -> float:
    """User and system time of every live process in a process group (a Procfile role, which
    the bench starts in a session of its own: gunicorn's arbiter and workers, an RQ worker)."""
    total = 0
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(entry / "stat")
        except OSError:  # the process ended while we looked
            continue
        if int(fields[2]) == group:
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def process_cpu_seconds(pid: int) -> float:
    fields = _stat_fields(PROC / str(pid) / "stat")
    return (int(fields[11]) + int(fields[12])) / TICKS


def children_cpu_seconds() -> float:
    """What this process's finished children used: the load generator, once it has exited."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stat_fields(path: Path) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces): state is field 0."""
    stat = path.read_text()
    return stat[stat.rindex(")") + 2 :].split()


class CpuMeter:
    """CPU seconds per role between `start` and `per_event`, by process group and pid."""

    def __init__(self, groups: Mapping[str, list[int]], pids: Mapping[str, int]) -> None:
        self.groups = groups
        self.pids = pids
        self.before: dict[str, float] = {}

    def read(self) -> dict[str, float]:
        seconds = {role: sum(map(group_cpu_seconds, gs)) for role, gs in self.groups.items()}
        seconds |= {role: process_cpu_seconds(pid) for role, pid in self.pids.items()}
        seconds["load generator"] = children_cpu_seconds()
        return seconds

    def start(self) -> None:
        self.before = self.read()

    def per_event(self, events: int) -> dict[str, float]:
        """Milliseconds of CPU per event of each role since `start`."""
        after = self.read()
        return {
            role: (after[role] - self.before.get(role, 0.0)) * 1000 / max(events, 1)
            for role in after
        }
