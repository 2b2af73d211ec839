"""The transition table, enforced by the transitions Machine."""

from __future__ import annotations

import itertools

import pytest
from transitions import Machine

from callstate.machine import TABLE, CallMachine
from callstate.schema import CALL_STATUSES

ALL_PAIRS = list(itertools.product(CALL_STATUSES, CALL_STATUSES))


@pytest.mark.parametrize(("source", "status"), ALL_PAIRS)
def test_a_move_is_allowed_exactly_when_the_table_lists_it(
    machine: CallMachine, source: str, status: str
) -> None:
    assert machine.advance(source, status) is (status in TABLE[source])


@pytest.mark.parametrize("status", CALL_STATUSES)
def test_a_new_call_accepts_any_status(machine: CallMachine, status: str) -> None:
    assert machine.advance(None, status)
    assert machine.state == status


def test_the_table_matches_the_specification() -> None:
    assert TABLE == {
        "created": ("started", "ringing", "answered", "agentEnded", "ended"),
        "started": ("ringing", "answered", "agentEnded", "ended"),
        "ringing": ("answered", "agentEnded", "ended"),
        "answered": ("agentEnded", "ended"),
        "agentEnded": ("ringing", "answered", "ended"),
        "ended": (),
    }


def test_one_machine_serves_many_calls_without_leaking_state(machine: CallMachine) -> None:
    assert machine.advance("answered", "agentEnded")
    assert not machine.advance("ended", "agentEnded")
    assert machine.advance("agentEnded", "ringing")
    assert isinstance(machine.machine, Machine)
    assert machine.machine.get_state("ended").final
