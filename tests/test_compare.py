"""`popek compare`: the side-by-side table and the plot."""
from __future__ import annotations

import json
from pathlib import Path

from popek.cli import main
from popek.experiments.compare import compare

GUESTS = Path(__file__).resolve().parent.parent / "samples" / "guests"


def test_compare_marks_native_reference_and_trap_divergence():
    cells = {(c.guest, c.monitor): c for c in compare([str(GUESTS / "timer.s"), str(GUESTS / "flags.s")],
                                                       ("native", "trap"))}
    assert cells[("timer.s", "native")].equivalent is None
    assert cells[("timer.s", "trap")].equivalent is True
    assert cells[("flags.s", "trap")].equivalent is False
    assert cells[("flags.s", "trap")].work["trap"] > 0
    assert cells[("timer.s", "native")].work == {}


def test_cli_json_exit_status_and_plot(tmp_path, capsys):
    png = tmp_path / "c.png"
    code = main(["compare", str(GUESTS / "flags.s"), "--monitors", "native,trap", "--format", "json",
                 "--plot", str(png)])
    assert code == 1
    rows = json.loads(capsys.readouterr().out)
    assert [r["monitor"] for r in rows] == ["native", "trap"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_unknown_monitor_is_a_usage_error(capsys):
    assert main(["compare", str(GUESTS / "hello.s"), "--monitors", "native,nosuch"]) == 2
    assert "unknown monitor" in capsys.readouterr().err
