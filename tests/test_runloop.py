"""The run loop (``popek.monitors.base.Run``): stepped in instruction slices, as several domains are, a run
is the same run as one driven to its end in one go — same console, exit, state, events and counts."""
from __future__ import annotations

from pathlib import Path

import pytest

from popek.machine import Machine
from popek.machine.guest import load_guest
from popek.monitors import get_monitor
from popek.monitors.base import Run, run

GUESTS = Path(__file__).resolve().parent.parent / "samples" / "guests"


def _document(result) -> dict:
    doc = result.to_dict()
    doc.pop("wall_seconds")
    return doc


@pytest.mark.parametrize("monitor", ["native", "trap", "bt"])
@pytest.mark.parametrize("guest, slice_", [("timer.s", 97), ("kernel.s", 1000), ("critical_section.s", 4096)])
def test_stepped_run_is_the_same_run(guest, slice_, monitor):
    image = load_guest(str(GUESTS / guest))
    whole = Machine()
    whole.load(image)
    expected = _document(run(whole, get_monitor(monitor)))

    machine = Machine()
    machine.load(image)
    stepped = Run(machine, get_monitor(monitor))
    steps = 0
    while stepped.step(slice_):
        steps += 1
        assert machine.instructions <= steps * slice_ + slice_       # a step never runs past its slice
    assert steps > 1
    assert _document(stepped.result()) == expected


def test_a_step_stops_at_its_slice_exactly():
    image = load_guest(str(GUESTS / "kernel.s"))
    machine = Machine()
    machine.load(image)
    stepped = Run(machine, get_monitor("native"))
    for n in range(1, 6):
        assert stepped.step(1234)
        assert machine.instructions == 1234 * n


def test_budget_ends_a_stepped_run():
    image = load_guest(str(GUESTS / "kernel.s"))
    machine = Machine()
    machine.load(image)
    stepped = Run(machine, get_monitor("native"), max_instructions=5000)
    while stepped.step(700):
        pass
    result = stepped.result()
    assert result.exit.reason == "budget" and result.guest_instructions == 5000
