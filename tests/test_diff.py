"""`popek diff`: native against a monitor, and the blame for each divergence (issue 3 §4)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from popek.cli import main
from popek.experiments.divergence import diff

GUESTS = Path(__file__).resolve().parent.parent / "samples" / "guests"


def _blamed(report, name):
    return [b for b in report.blamed if b["name"] == name]


def test_native_against_itself_is_equivalent():
    report = diff(str(GUESTS / "store_tables.s"), "native")
    assert report.equivalent and report.blamed == []


def test_privileged_only_guest_is_equivalent_under_trap():
    report = diff(str(GUESTS / "timer.s"), "trap")
    assert report.equivalent, report.differences


def test_sgdt_is_blamed_with_both_values():
    report = diff(str(GUESTS / "store_tables.s"), "trap")
    assert not report.equivalent
    assert any(d.startswith("console line 3") and "sgdt" in d for d in report.differences)
    (sgdt,) = _blamed(report, "sgdt")
    assert sgdt["native"] == "GDTR base=0x00001000 limit=0x0027"   # the guest's own GDT
    assert sgdt["saw"] != sgdt["native"] and sgdt["saw"].startswith("GDTR base=")
    for name in ("sidt", "sldt", "str", "smsw"):
        assert _blamed(report, name), name


def test_pushf_is_blamed_for_the_interrupt_flag():
    report = diff(str(GUESTS / "flags.s"), "trap")
    pushf = _blamed(report, "pushf")
    assert pushf and all("EFLAGS.IF 1" in b["saw"] for b in pushf)
    assert pushf[0]["native"].startswith("EFLAGS.IF 0")


def test_kernel_reading_cs_is_blamed():
    report = diff(str(GUESTS / "kernel.s"), "trap")
    assert report.differences[0].startswith("console line 1")
    (mov,) = _blamed(report, "mov_from_seg")
    assert "CPL 3" in mov["saw"] and "CPL 0" in mov["native"]


def test_cli_text_and_json(capsys):
    assert main(["diff", str(GUESTS / "store_tables.s"), "--monitor", "trap"]) == 1
    out = capsys.readouterr().out
    assert "DIVERGES" in out and "sgdt at 0x" in out and "the bare machine gave GDTR base=0x00001000" in out
    assert main(["diff", str(GUESTS / "hello.s"), "--monitor", "trap", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["equivalent"] is True and doc["monitor"] == "trap"


@pytest.mark.parametrize("argv, fragment", [
    (["diff", "/nonexistent.s"], "nonexistent"),
    (["diff", str(GUESTS / "hello.s"), "--monitor", "nosuch"], "unknown monitor"),
])
def test_bad_input(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
