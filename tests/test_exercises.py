"""``popek exercise``: each shipped solution passes its checker, and each wrong answer fails with feedback
that says what is wrong (the checkers run the real theorem checker, ``popek diff`` and the monitors)."""
from __future__ import annotations

from pathlib import Path

import pytest

from popek.classroom import exercises as ex
from popek.cli import main

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "exercises"
PDP10 = (ROOT / "samples" / "isa" / "pdp10.isa").read_text()


def _check(number: int, *paths) -> ex.Feedback:
    return ex.check(ex.get(number), [str(p) for p in paths])


def _isa(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.isa"
    path.write_text(text)
    return path


def test_every_exercise_has_a_text_a_checker_and_a_solution_here():
    numbers = [e.number for e in ex.exercises()]
    assert numbers == sorted(set(numbers)) and numbers[:2] == [1, 2]
    for e in ex.exercises():
        assert e.checker in ex.CHECKERS and e.body.strip() and e.submit
        assert list(FIXTURES.glob(f"{e.number:02}-solution*")), f"exercise {e.number} has no solution in tests"


@pytest.mark.parametrize("solution", sorted(FIXTURES.glob("01-solution*")), ids=lambda p: p.name)
def test_1_solutions_pass(solution):
    feedback = _check(1, solution)
    assert feedback.passed, feedback.lines
    assert any("jrst1" in line and "trap" in line for line in feedback.lines)


def test_1_the_unchanged_description_fails_naming_the_instruction(tmp_path):
    feedback = _check(1, _isa(tmp_path, PDP10))
    assert not feedback.passed
    assert any("Theorem 1 still fails: jrst1" in line for line in feedback.lines)


def test_1_deleting_the_instruction_is_not_a_fix(tmp_path):
    start = PDP10.index("instruction jrst1")
    end = PDP10.index("}", start) + 1
    feedback = _check(1, _isa(tmp_path, PDP10[:start] + PDP10[end:]))
    assert not feedback.passed
    assert any(line.startswith("jrst1 is gone") for line in feedback.lines)


def test_1_declaring_it_innocuous_is_not_a_fix(tmp_path):
    start = PDP10.index("instruction jrst1")
    end = PDP10.index("}", start) + 1
    text = PDP10[:start] + 'instruction jrst1 {\n    summary "JRST 1"\n    category innocuous\n    privileged no\n}' + PDP10[end:]
    feedback = _check(1, _isa(tmp_path, text))
    assert not feedback.passed
    assert any("you changed what jrst1 does" in line for line in feedback.lines)


def test_1_a_syntax_error_is_feedback_with_its_position(tmp_path):
    feedback = _check(1, _isa(tmp_path, PDP10.replace("instruction move {", "instruction move {{")))
    assert not feedback.passed
    assert "does not parse" in feedback.lines[0] and "mine.isa:" in feedback.lines[0]


def test_2_solution_passes():
    feedback = _check(2, FIXTURES / "02-solution.txt")
    assert feedback.passed, feedback.lines


def test_2_wrong_answers_say_why(tmp_path):
    answer = tmp_path / "answer.txt"
    answer.write_text("pushfd\ncli\nsmsw\nmov\nfrobnicate\n")
    feedback = _check(2, answer)
    text = "\n".join(feedback.lines)
    assert not feedback.passed
    assert "pushf: yes" in text                              # a mnemonic that names one instruction is taken
    assert "cli is privileged" in text
    assert "smsw is sensitive-unprivileged, so it could leak, but" in text
    assert "'mov' names several instructions" in text
    assert "'frobnicate' is not an instruction name" in text
    assert "1 more instruction between probe_start and probe_end" in text


def test_command_exit_codes(tmp_path, capsys):
    assert main(["exercise", "list"]) == 0
    assert "Make the PDP-10 virtualizable" in capsys.readouterr().out
    assert main(["exercise", "show", "1", "--files", str(tmp_path / "start")]) == 0
    assert (tmp_path / "start" / "pdp10.isa").read_text() == PDP10
    assert main(["exercise", "check", "1", str(tmp_path / "start" / "pdp10.isa")]) == 1
    assert "not yet" in capsys.readouterr().out
    assert main(["exercise", "check", "2", str(FIXTURES / "02-solution.txt")]) == 0
    for bad in (["exercise", "show", "99"], ["exercise", "check", "1"],
                ["exercise", "check", "1", str(tmp_path / "missing.isa")]):
        capsys.readouterr()
        assert main(bad) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert main(["exercise", "check", "x"]) == 2
