"""No prefix hides an instruction: every canonical instruction's encoding × every legacy prefix (and pairs of
prefixes, and REX in 64-bit mode), in 16-, 32- and 64-bit code, against GNU objdump.

The encodings come from the fixture sources assembled by GNU as (objdump names each one); each prefixed case
sits at the start of its own 32-byte slot padded with NOPs, so one case that decodes longer or shorter cannot
desynchronise the next. All cases of one mode go to one objdump run and one popek scan. A finding's address
is the first prefix byte, as objdump prints it.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from popek.cli import main
from popek.experiments.objdump_oracle import sites_from_listing

FIXTURES = Path(__file__).parent / "fixtures" / "asm"
pytestmark = pytest.mark.skipif(not (shutil.which("as") and shutil.which("objdump")),
                                reason="GNU binutils (as, objdump) not installed")

LEGACY = [0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65]
# Pairs from different prefix groups (objdump prints a repeated prefix of one group on a line of its own).
PAIRS = [(0x66, 0xF2), (0xF3, 0x66), (0xF2, 0x3E), (0x3E, 0xF2), (0x67, 0x66), (0xF0, 0x64), (0x26, 0xF3),
         (0x65, 0x67), (0xF2, 0x2E), (0x66, 0x67)]
REX = [0x40, 0x41, 0x48, 0x4F]
SLOT = 32
# Where popek and objdump knowingly differ: objdump prints (bad) for WBINVD behind a 66 or F2 prefix, which
# Capstone decodes as WBINVD (F3 0F 09 is WBNOINVD to both). popek reports it: a privileged site shown too
# many costs the analyst a look, one too few hides it.
OBJDUMP_BAD = {("wbinvd", b"\x0f\x09")}
MODES = {16: ("system16", "--32", "i8086", [".code16"]), 32: ("system32", "--32", "i386", []),
         64: ("system64", "--64", "i386:x86-64", [])}


def _canonical_encodings(tmp_path: Path, mode: int) -> dict[bytes, str]:
    """Each site's bytes in the fixture of ``mode``, with objdump's canonical name for it."""
    name, flag, machine, _ = MODES[mode]
    obj = tmp_path / f"{name}.o"
    subprocess.run(["as", flag, "-o", str(obj), str(FIXTURES / f"{name}.s")], check=True, capture_output=True)
    extra = ["-m", "i8086"] if mode == 16 else []
    listing = subprocess.run(["objdump", "-d", "-w", *extra, str(obj)], check=True, capture_output=True,
                             text=True).stdout
    encodings = {}
    for line in listing.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\t([0-9a-f ]+)\t", line)
        if not m:
            continue
        sites = sites_from_listing(line + "\n")
        if sites:
            ((_, canonical),) = sites
            encodings[bytes.fromhex(m.group(2))] = canonical
    return encodings


def _cases(encodings: dict[bytes, str], mode: int) -> list[bytes]:
    prefix_sets = [bytes([p]) for p in LEGACY] + [bytes(pair) for pair in PAIRS]
    if mode == 64:
        # REX goes last (right before the opcode), after any legacy prefix.
        prefix_sets += [bytes([r]) for r in REX] + [bytes([p, r]) for p in (0x66, 0xF2, 0xF3, 0x3E) for r in REX[:3]]
    cases = []
    for encoding in encodings:
        legacy_end = 0
        while legacy_end < len(encoding) and encoding[legacy_end] in LEGACY:
            legacy_end += 1
        for prefixes in prefix_sets:
            if mode == 64 and 0x40 <= encoding[legacy_end] <= 0x4F and any(0x40 <= p <= 0x4F for p in prefixes):
                continue  # already has a REX
            # The new prefixes go in front (REX: in front of the opcode, behind the legacy prefixes).
            if prefixes[-1] in REX and mode == 64:
                case = encoding[:legacy_end] + prefixes[:-1] + prefixes[-1:] + encoding[legacy_end:]
                case = prefixes[:-1] + encoding[:legacy_end] + prefixes[-1:] + encoding[legacy_end:]
            else:
                case = prefixes + encoding
            if len(case) <= 15:
                cases.append(case)
    return cases


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_prefix_matrix_against_objdump(mode, tmp_path, capsys):
    _, _, machine, _ = MODES[mode]
    encodings = _canonical_encodings(tmp_path, mode)
    assert len(encodings) >= 30, "the fixture should name most canonical instructions"
    cases = _cases(encodings, mode)
    blob = b"".join(case + b"\x90" * (SLOT - len(case)) for case in cases)
    flat = tmp_path / f"matrix{mode}.bin"
    flat.write_bytes(blob)
    listing = subprocess.run(["objdump", "-D", "-w", "-b", "binary", "-m", machine, str(flat)], check=True,
                             capture_output=True, text=True).stdout
    expected = sites_from_listing(listing)
    code = main(["scan", "--format", "json", "--mode", str(mode), "--base", "0", str(flat)])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1, doc
    got = {(int(f["address"], 16), f["name"]) for f in doc["files"][0]["findings"]}
    missed = sorted(expected - got)
    extra = sorted(s for s in got - expected
                   if (s[1], cases[s[0] // SLOT].lstrip(bytes(LEGACY + REX))) not in OBJDUMP_BAD)

    def show(sites):
        return [f"{cases[a // SLOT].hex(' ')} @+{a % SLOT}: {n}" for a, n in sites[:20]]

    assert len(expected) >= len(cases) // 2
    assert not missed, f"{len(missed)} of {len(expected)} objdump sites missed:\n" + "\n".join(show(missed))
    assert not extra, f"{len(extra)} sites objdump does not show:\n" + "\n".join(show(extra))
    # Every case that objdump names at its slot's first byte (the first prefix) is found there.
    assert {a for a, _ in expected if a % SLOT == 0} <= {a for a, _ in got}


@pytest.mark.parametrize("hexbytes, name", [
    ("f26e", "outs"), ("f2ca0800", "ret_far"), ("f2ff1d00100000", "call_far"), ("3eff2f", "jmp_far"),
    ("f3ea000000000800", "jmp_far"), ("f20f0100", "sgdt"), ("2e9c", "pushf"),
])
def test_the_prefixed_forms_of_the_issue_are_found(hexbytes, name, tmp_path, capsys):
    flat = tmp_path / "case.bin"
    flat.write_bytes(bytes.fromhex(hexbytes))
    code = main(["scan", "--format", "json", "--mode", "32", "--base", "0x1000", str(flat)])
    (finding,) = json.loads(capsys.readouterr().out)["files"][0]["findings"]
    assert (finding["address"], finding["name"], finding["size"]) == ("0x1000", name, len(hexbytes) // 2)
    assert code == (0 if finding["class"] == "io" else 1)   # exit 1 means sensitive-unprivileged found


def test_lock_on_a_sensitive_instruction_is_found_at_the_lock_byte(tmp_path, capsys):
    """Capstone refuses LOCK on SGDT and decodes from the next byte; objdump prints `lock sgdt`; the CPU
    raises #UD. The finding starts at the LOCK byte and says so."""
    flat = tmp_path / "lock.bin"
    flat.write_bytes(bytes.fromhex("90f00f0100"))
    main(["scan", "--format", "json", "--mode", "32", "--base", "0", str(flat)])
    (finding,) = json.loads(capsys.readouterr().out)["files"][0]["findings"]
    assert (finding["address"], finding["size"], finding["bytes"]) == ("0x1", 4, "f00f0100")
    assert finding["text"].startswith("lock sgdt") and "#UD" in finding["why"]
