"""The call state machine: one declarative table, enforced by a `transitions` Machine."""

from __future__ import annotations

from typing import Any

from transitions import Machine, MachineError, State

from callstate.schema import CALL_STATUSES

NEW = "new"  # Before the first accepted event: any provider status may start a call.
FINAL = "ended"

# Allowed moves between the provider's statuses; the trigger of each move is its destination.
TABLE: dict[str, tuple[str, ...]] = {
    "created": ("started", "ringing", "answered", "agentEnded", "ended"),
    "started": ("ringing", "answered", "agentEnded", "ended"),
    "ringing": ("answered", "agentEnded", "ended"),
    "answered": ("agentEnded", "ended"),
    "agentEnded": ("ringing", "answered", "ended"),
    "ended": (),
}


def definition() -> dict[str, Any]:
    """The machine as `transitions` takes it, from TABLE: what the call machine enforces and what
    the README's diagram (callstate/diagram.py) draws."""
    return {
        "states": [State(NEW)] + [State(s, final=s == FINAL) for s in CALL_STATUSES],
        "transitions": _transitions(),
        "initial": NEW,
        "auto_transitions": False,
    }


def _transitions() -> list[dict[str, str]]:
    edges = [{"trigger": status, "source": NEW, "dest": status} for status in CALL_STATUSES]
    for source, dests in TABLE.items():
        edges += [{"trigger": dest, "source": source, "dest": dest} for dest in dests]
    return edges


class CallMachine:
    """One Machine per process; a call's state is loaded into it for each event, not rebuilt."""

    state: str

    def __init__(self) -> None:
        self.machine = Machine(model=self, send_event=False, **definition())

    def advance(self, current: str | None, status: str) -> bool:
        """Move from `current` (None: a new call) on `status`; False when the table forbids it."""
        self.machine.set_state(current or NEW, model=self)
        try:
            return bool(self.trigger(status))  # type: ignore[attr-defined]
        except MachineError:
            return False
