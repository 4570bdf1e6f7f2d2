"""The ISA description language, the bundled IA-32 description and the theorem checker."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from popek.cli import main
from popek.errors import SourceError
from popek.isa import language
from popek.isa.theorem import check

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "isa"

# DESIGN §3.1: every canonical name the bundled description must define.
SENSITIVE_UNPRIVILEGED = """sgdt sidt sldt smsw str pushf popf lar lsl verr verw push_seg pop_seg mov_from_seg
    mov_to_seg call_far jmp_far ret_far int iret""".split()
PRIVILEGED_OR_IO = """lgdt lidt lldt ltr lmsw clts mov_cr mov_dr invlpg hlt cli sti in out ins outs rdmsr wrmsr
    rdtsc rdpmc cpuid wbinvd invd""".split()
EXTENDED = """int3 into int1 syscall sysret sysenter sysexit swapgs rdtscp rsm stac clac xsetbv monitor mwait
    invpcid wbnoinvd getsec vmx vmcall svm vmmcall""".split()


@pytest.fixture(scope="module")
def ia32():
    return language.bundled()


def test_bundled_description_covers_every_canonical_name(ia32):
    names = set(ia32.instructions)
    assert set(SENSITIVE_UNPRIVILEGED) <= names
    assert set(PRIVILEGED_OR_IO) <= names
    assert set(EXTENDED) <= names
    for name in SENSITIVE_UNPRIVILEGED:
        assert ia32.instructions[name].category == "sensitive-unprivileged", name
    for name in PRIVILEGED_OR_IO:
        assert ia32.instructions[name].category in ("privileged", "io"), name
    for insn in ia32.instructions.values():
        assert insn.sources, f"{insn.name} has no source"
        assert insn.matches, f"{insn.name} cannot be recognised in decoded code"


def test_bundled_models(ia32):
    assert {"ia32", "ia32-umip", "vtx", "svm", "sun4v"} <= set(ia32.models)
    assert ia32.models["ia32-umip"].base == "ia32"


def test_theorem_ia32_lists_the_sensitive_unprivileged_instructions(ia32):
    r = check(ia32, "ia32")
    t1 = {v.instruction.name for v in r.theorem1_violations}
    assert set(SENSITIVE_UNPRIVILEGED) <= t1
    assert not t1 & set(PRIVILEGED_OR_IO)
    assert not r.to_dict()["theorem1"]["holds"]
    assert not r.to_dict()["theorem3"]["holds"]
    # Robin & Irvine's list: 18 mnemonics, 6 + 12 in their two groups.
    mnemonics = [m for _, m in r.robin_irvine]
    assert len(mnemonics) == 18
    assert sum(1 for g, _ in r.robin_irvine if g == "sensitive-register") == 6
    assert "seventeen" in " ".join(r.model.notes)


def test_theorem_umip_closes_the_store_instructions_only(ia32):
    r = check(ia32, "ia32-umip")
    t1 = {v.instruction.name for v in r.theorem1_violations}
    assert not t1 & {"sgdt", "sidt", "sldt", "smsw", "str"}
    assert {"pushf", "popf", "push_seg", "mov_from_seg", "call_far", "iret"} <= t1


@pytest.mark.parametrize("model", ["vtx", "svm", "sun4v"])
def test_hardware_and_sun4v_models_are_virtualizable(ia32, model):
    d = check(ia32, model).to_dict()
    assert d["theorem1"] == {"holds": True, "violations": [], "why": {}}
    assert d["theorem3"]["holds"]


def test_vtx_sgdt_is_not_sensitive_because_nonroot_has_its_own_gdtr(ia32):
    v = ia32.verdict(ia32.instructions["sgdt"], ia32.models["vtx"])
    assert not v.sensitive and not v.traps
    assert "own copy" in v.why
    assert ia32.verdict(ia32.instructions["cpuid"], ia32.models["vtx"]).traps


def test_toy_machine_is_virtualizable():
    isa = language.load(SAMPLES / "popek-goldberg.isa")
    d = check(isa, "machine").to_dict()
    assert d["theorem1"]["holds"] and d["theorem3"]["holds"]


def test_pdp10_jrst1_breaks_theorem1_but_theorem3_holds():
    isa = language.load(SAMPLES / "pdp10.isa")
    d = check(isa, "monitor").to_dict()
    assert d["theorem1"] == {"holds": False, "violations": ["jrst1"], "why": d["theorem1"]["why"]}
    assert d["theorem3"]["holds"]


@pytest.mark.parametrize("model, holds1", [("ia32", False), ("ia32-umip", False), ("vtx", True), ("sun4v", True)])
def test_theorem_command_json(capsys, model, holds1):
    assert main(["theorem", model, "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == model
    assert d["theorem1"]["holds"] is holds1
    assert set(d) >= {"model", "theorem1", "theorem3"}


def test_theorem_command_text_explains(capsys):
    assert main(["theorem", "ia32"]) == 0
    out = capsys.readouterr().out
    assert "FAILS" in out and "sgdt" in out and "seventeen" in out and "18 mnemonics" in out
    assert main(["theorem", "vtx"]) == 0
    out = capsys.readouterr().out
    assert "HOLDS" in out and "virtualizable" in out and "GDTR" in out


def test_theorem_command_toy_isa_default_model(capsys):
    assert main(["theorem", "--isa", str(SAMPLES / "pdp10.isa"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["theorem1"]["violations"] == ["jrst1"]


def test_isa_command_table_and_json(capsys):
    assert main(["isa", "ia32-umip"]) == 0
    assert "sgdt" in capsys.readouterr().out
    assert main(["isa", "vtx", "--format", "json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["instructions"]}
    assert rows["sgdt"]["under_model"]["verdict"] == "virtualized"
    assert rows["cpuid"]["under_model"]["verdict"] == "traps"


def test_unknown_model_is_a_usage_error(capsys):
    assert main(["theorem", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nosuch'" in err and "Traceback" not in err


# (message fragment, bad description, line, column). Every row must produce `FILE:LINE:COL: message`.
HEADER = 'isa t "t"\nstate S "s"\n'
ERRORS = [
    ("unexpected", 'isa t "t"\ninstruction {', 2, 13),
    ("unexpected character", 'isa t "t"\nstate S "s" @', 2, 13),
    ("unexpected end of file", HEADER + 'instruction a { category innocuous privileged no', 3, 47),
    ("unknown category 'bogus'", HEADER + 'instruction a {\n category bogus privileged no }', 4, 11),
    ("unknown privilege 'maybe'", HEADER + 'instruction a { category innocuous privileged maybe }', 3, 47),
    ("unknown sensitivity kind 'weird'", HEADER + 'instruction a { category privileged privileged yes\n sensitive weird "x" deprivileged trap "t" }', 4, 12),
    ("duplicate instruction a", HEADER + 'instruction a { category innocuous privileged no }\ninstruction a { category innocuous privileged no }', 4, 13),
    ("undefined state 'T'", HEADER + 'instruction a { category innocuous privileged no reads T }', 3, 56),
    ("undefined model 'base'", HEADER + 'model m extends base "x" { }', 3, 17),
    ("undefined instruction 'b'", HEADER + 'model m "x" { trap b "why" }', 3, 20),
    ("missing 'privileged'", HEADER + 'instruction a { category innocuous }', 3, 13),
    ("contradicts", HEADER + 'instruction a { category privileged privileged yes deprivileged silent "x" }', 3, 13),
    ("given twice", HEADER + 'instruction a { category innocuous category innocuous privileged no }', 3, 45),
    ("duplicate model m", HEADER + 'model m "x" { }\nmodel m "y" { }', 4, 7),
    ("missing 'isa", 'state S "s"', 1, 1),
    ("unknown operand kind 'xmm'", HEADER + 'instruction a { match mov operand xmm category innocuous privileged no }', 3, 35),
]


@pytest.mark.parametrize("fragment, text, line, column", ERRORS, ids=[e[0] for e in ERRORS])
def test_description_errors_have_positions(fragment, text, line, column):
    with pytest.raises(SourceError) as info:
        language.parse(text, "bad.isa")
    err = info.value
    assert fragment in err.message
    assert (err.line, err.column) == (line, column), str(err)
    assert str(err).startswith(f"bad.isa:{line}:{column}: ")


def test_error_context_shows_the_line_with_a_caret():
    with pytest.raises(SourceError) as info:
        language.parse(HEADER + "instruction a {\n category bogus privileged no }", "bad.isa")
    assert info.value.context.splitlines() == [" category bogus privileged no }", "          ^"]


def test_cli_reports_description_errors_as_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.isa"
    bad.write_text(HEADER + "instruction a { category bogus privileged no }")
    assert main(["theorem", "--isa", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:3:" in err


def test_missing_description_file(tmp_path, capsys):
    assert main(["theorem", "--isa", str(tmp_path / "none.isa")]) == 2
    assert "cannot read" in capsys.readouterr().err
