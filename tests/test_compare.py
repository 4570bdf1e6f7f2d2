"""`popek compare`: every monitor of the registry against native, on modelled cycles; the table, CSV, JSON,
the plot, and the usage errors."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from popek.cli import main
from popek.experiments.compare import compare
from popek.monitors import MONITORS

GUESTS = Path(__file__).resolve().parent.parent / "samples" / "guests"


def _cells(guests, monitors=None, **kw):
    return {(c.guest, c.monitor): c for c in compare([str(GUESTS / g) for g in guests], monitors, **kw).cells}


def test_native_is_the_reference_and_trap_diverges_on_flags():
    cells = _cells(["timer.s", "flags.s"], ("native", "trap", "bt"))
    assert cells[("timer.s", "native")].status == "reference"
    assert cells[("timer.s", "bt")].status == "equivalent"
    # Under trap the CPU sets the accessed bits in the shadow GDT, not in the guest's: guest RAM differs.
    assert cells[("timer.s", "trap")].status == "diverges"
    assert cells[("timer.s", "trap")].first_difference.startswith("guest RAM differs")
    assert cells[("flags.s", "trap")].status == "diverges"
    assert "console line" in cells[("flags.s", "trap")].first_difference
    assert cells[("flags.s", "trap")].work["trap"] > 0
    assert cells[("timer.s", "native")].work == {}


def test_native_runs_even_when_not_asked_for():
    assert [m for (_, m) in _cells(["hello.s"], ("trap",))] == ["native", "trap"]


def test_monitors_default_to_the_registry():
    assert [m for (_, m) in _cells(["hello.s"])] == ["native"] + [m for m in MONITORS if m != "native"]


def test_bt_work_includes_its_translations():
    # The old _WORK prefixes ("translate", "invalidate") matched none of bt's kinds: no translations shown.
    work = _cells(["timer.s"], ("bt",))[("timer.s", "bt")].work
    assert work["translation"] > 0 and work["callout"] > 0


def test_trap_events_are_not_counted_twice_in_cycles():
    # trap and emulate are two prices of one trapped instruction (the round trip, the routine), each counted once
    c = _cells(["timer.s"], ("trap",))[("timer.s", "trap")]
    assert c.work["trap"] == c.work["emulate"]
    assert set(c.breakdown) >= {"trap", "emulate", "instructions"}


def test_a_budget_ended_run_is_undecided_never_equivalent():
    c = _cells(["timer.s"], ("trap",), max_instructions=500)[("timer.s", "trap")]
    assert c.status == "undecided" and "budget" in c.first_difference


def test_cli_json_csv_exit_status_and_plot(tmp_path, capsys):
    png = tmp_path / "c.png"
    assert main(["compare", str(GUESTS / "flags.s"), "--monitors", "trap", "--format", "json",
                 "--profile", "p4-2006", "--plot", str(png)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["profile"] == "p4-2006" and doc["reference"] == "native"
    assert [c["monitor"] for c in doc["cells"]] == ["native", "trap"]
    assert all(isinstance(c["modelled_cycles"], int) for c in doc["cells"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["compare", str(GUESTS / "hello.s"), "--monitors", "bt", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["monitor"] for r in rows] == ["native", "bt"] and rows[1]["status"] == "equivalent"


@pytest.mark.parametrize("args, message", [
    (["--monitors", "native,nosuch"], "unknown monitor"),
    (["--monitors", ""], "--monitors: is empty"),
    (["--monitors", " , "], "--monitors: is empty"),
    (["--profile", "nope"], "unknown profile"),
])
def test_usage_errors(args, message, capsys):
    assert main(["compare", str(GUESTS / "hello.s"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
