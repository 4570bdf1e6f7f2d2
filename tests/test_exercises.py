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


SOLUTION_3 = (FIXTURES / "03-solution.s").read_text()


def _port(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ticker.s"
    path.write_text(text)
    return path


def test_3_solution_passes_under_pv_and_still_builds_natively():
    feedback = _check(3, FIXTURES / "03-solution.s")
    assert feedback.passed, feedback.lines
    assert "exits with 5" in feedback.lines[0] and "set_timer_op" in feedback.lines[0]
    assert "still runs natively" in feedback.lines[1]


def test_3_the_unported_kernel_crashes_and_the_feedback_names_the_hypercall():
    feedback = _check(3, ROOT / "samples" / "exercises" / "ticker.s")
    assert not feedback.passed
    assert "crashed: lgdt" in feedback.lines[0] and "HYPERVISOR_set_gdt" in feedback.lines[0]


def test_3_printing_the_answer_without_the_hypervisors_timer_is_not_a_port(tmp_path):
    fake = ('        .include "../guests/pm.inc"\n        .include "../guests/console.inc"\n'
            '        .equ GUEST_ID, 10\n_start:\n        plat_setup\n        print "ticker: ..... 5 ticks\\n"\n'
            '        exit 5\n        pm_data\n        console_lib\n')
    feedback = _check(3, _port(tmp_path, fake))
    text = "\n".join(feedback.lines)
    assert not feedback.passed
    assert "no hypercall set_timer_op" in text and "no upcall event" in text
    assert "does not behave like" not in text            # the output itself is right: the feedback says why it fails


def test_3_a_port_that_never_unmasks_events_waits_forever(tmp_path):
    # `idle` blocks, which unmasks events; spinning with them masked never takes a tick
    text = SOLUTION_3.replace("        idle\n", "        irq_disable\n")
    feedback = _check(3, _port(tmp_path, text))
    assert not feedback.passed
    assert "had not finished after 2,000,000 instructions" in feedback.lines[0]
    assert "waiting for an event that never arrives" in feedback.lines[0]


def test_3_wrong_output_and_build_errors_are_named(tmp_path):
    feedback = _check(3, _port(tmp_path, SOLUTION_3.replace(".equ TICKS, 5", ".equ TICKS, 4")))
    assert not feedback.passed and "console line 1" in feedback.lines[0] and "4 ticks" in feedback.lines[0]
    feedback = _check(3, _port(tmp_path, SOLUTION_3.replace("        idle\n", "        idle 3\n")))
    assert not feedback.passed and feedback.lines[0].startswith("your port does not build with -D PV:")


def test_4_solution_passes():
    feedback = _check(4, FIXTURES / "04-solution.toml")
    assert feedback.passed, feedback.lines
    assert feedback.lines == ["[kvm] right: 6 exits (CPUID 1, CR_ACCESS 1, IO_INSTRUCTION 4)",
                              "[vtx-2005] right: 11 exits (CPUID 1, CR_ACCESS 3, EXCEPTION_NMI 1, INVLPG 2, IO_INSTRUCTION 4)"]


def test_4_the_same_answer_for_both_sets_is_wrong_by_the_shadow_paging_exits(tmp_path):
    answer = tmp_path / "answer.toml"
    answer.write_text("[kvm]\nCR_ACCESS = 1\nCPUID = 1\nIO_INSTRUCTION = 4\n"
                      "[vtx-2005]\nCR_ACCESS = 1\nCPUID = 1\nIO_INSTRUCTION = 4\n")
    feedback = _check(4, answer)
    assert not feedback.passed
    assert feedback.lines[0].startswith("[kvm] right")
    assert "[vtx-2005] CR_ACCESS: you predicted 1, hvm makes 3 (2 too few); look again at the guest's mov_cr" in feedback.lines
    assert "[vtx-2005] INVLPG: you predicted 0, hvm makes 2 (2 too few); look again at the guest's invlpg" in feedback.lines


def test_4_wrong_answers_say_what_is_wrong(tmp_path):
    answer = tmp_path / "answer.toml"
    answer.write_text("[kvm]\nCR_ACCESS = 3\nRDTSC = 1\nCPUID = -1\nIO_INSTRUCTION = 4\n[vtx-2005]\nCR_ACESS = 3\n"
                      "[svm]\nCPUID = 1\n")
    text = "\n".join(_check(4, answer).lines)
    assert "[kvm] CR_ACCESS: you predicted 3, hvm makes 1 (2 too many)" in text
    assert "[kvm] RDTSC: you predicted 1, hvm makes 0 (1 too many); no instruction of this guest" in text
    assert "[kvm] CPUID = -1: a count is a whole number" in text
    assert "[vtx-2005] CR_ACESS is not a VT-x basic exit reason" in text
    assert "[svm] is not one of the control sets asked about" in text
    answer.write_text("[kvm\nCPUID = 1\n")
    feedback = _check(4, answer)
    assert not feedback.passed and "is not TOML" in feedback.lines[0]
    answer.write_text("[kvm]\nCR_ACCESS = 1\nCPUID = 1\nIO_INSTRUCTION = 4\n")
    assert "no [vtx-2005] table" in "\n".join(_check(4, answer).lines)


def test_show_copies_the_starting_guest(tmp_path, capsys):
    assert main(["exercise", "show", "3", "--files", str(tmp_path)]) == 0
    assert (tmp_path / "ticker.s").read_text() == (ROOT / "samples" / "exercises" / "ticker.s").read_text()
    # the copy still builds: its .include paths are found in samples/guests
    feedback = _check(3, tmp_path / "ticker.s")
    assert not feedback.passed and "crashed" in feedback.lines[0]
