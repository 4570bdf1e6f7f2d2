"""``popek demo``: the guided tour's steps, each reproducible by the commands it prints."""
from __future__ import annotations

import pytest

from popek.classroom.tour import STEPS
from popek.cli import main


def test_list_names_every_step(capsys):
    assert main(["demo", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{n}. {s.title}" for n, s in enumerate(STEPS, 1)]


@pytest.mark.parametrize("n", range(1, len(STEPS) + 1))
def test_each_step_shows_its_commands_and_its_content(n, capsys):
    assert main(["demo", "--step", str(n)]) == 0
    out = capsys.readouterr().out
    assert f"{n}. {STEPS[n - 1].title}" in out
    assert all(f"$ {c}" in out for c in STEPS[n - 1].commands)
    expected = {1: "jrst1    sensitive", 2: "Robin & Irvine", 3: "sgdt at", 4: "bt", 5: "native"}[n]
    assert expected in out


def test_step_three_names_the_diverging_instruction_and_four_rescues_it(capsys):
    main(["demo", "--step", "3"])
    assert "DIVERGES" in capsys.readouterr().out
    main(["demo", "--step", "4"])
    assert "bt       same as native" in capsys.readouterr().out


def test_never_pauses_without_a_terminal(capsys):
    # stdin is not a terminal under pytest: the whole tour runs through without reading input
    assert main(["demo"]) == 0
    assert "5. What it costs" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["demo", "--step", "0"], ["demo", "--step", "9"], ["demo", "--samples", "/nonexistent"]])
def test_bad_options_are_one_line_errors(bad, capsys):
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
