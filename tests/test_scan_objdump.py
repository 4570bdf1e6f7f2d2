"""`popek scan --strategy linear` finds exactly the sites GNU objdump's disassembly shows.

The oracle is independent of popek: GNU as builds the binaries, objdump disassembles them (AT&T syntax), and
the small table below maps objdump's mnemonics and operands to canonical names. For each binary the set of
(address, canonical name) must be equal.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from popek.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "asm"
pytestmark = pytest.mark.skipif(not (shutil.which("as") and shutil.which("objdump") and shutil.which("ld")),
                                reason="GNU binutils (as, ld, objdump) not installed")

_SEG = r"%(?:cs|ds|es|fs|gs|ss)"
_PREFIXES = {"rep", "repz", "repe", "repnz", "repne", "lock", "data16", "data32", "addr16", "addr32", "rex.W",
             "rex", "cs", "ds", "es", "fs", "gs", "ss", "notrack", "bnd"}
# objdump (AT&T) mnemonic, without size suffix where one exists -> canonical name
_SIMPLE = {
    "sgdt": "sgdt", "sidt": "sidt", "sldt": "sldt", "smsw": "smsw", "str": "str", "pushf": "pushf",
    "popf": "popf", "lar": "lar", "lsl": "lsl", "verr": "verr", "verw": "verw", "lcall": "call_far",
    "ljmp": "jmp_far", "lret": "ret_far", "int": "int", "iret": "iret", "lgdt": "lgdt", "lidt": "lidt",
    "lldt": "lldt", "ltr": "ltr", "lmsw": "lmsw", "clts": "clts", "invlpg": "invlpg", "hlt": "hlt",
    "cli": "cli", "sti": "sti", "in": "in", "out": "out", "ins": "ins", "outs": "outs", "rdmsr": "rdmsr",
    "wrmsr": "wrmsr", "rdtsc": "rdtsc", "rdpmc": "rdpmc", "cpuid": "cpuid", "wbinvd": "wbinvd", "invd": "invd",
}


def objdump_sites(args: list[str]) -> set[tuple[int, str]]:
    out = subprocess.run(["objdump", *args], check=True, capture_output=True, text=True).stdout
    sites = set()
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\t[0-9a-f ]+\t(.*)$", line)
        if not m:
            continue
        address, text = int(m.group(1), 16), m.group(2).split("#")[0].strip()
        words = text.split(None, 1)
        while words and words[0] in _PREFIXES:
            words = words[1].split(None, 1) if len(words) > 1 else []
        if not words:
            continue
        mnemonic, operands = words[0], (words[1] if len(words) > 1 else "")
        name = _canonical(mnemonic, operands)
        if name:
            sites.add((address, name))
    return sites


def _canonical(mnemonic: str, operands: str) -> str | None:
    ops = [o.strip() for o in re.split(r",(?![^(]*\))", operands)] if operands else []
    is_seg = [bool(re.fullmatch(_SEG, o)) for o in ops]
    if mnemonic.startswith("push") and ops and is_seg[0]:
        return "push_seg"
    if mnemonic.startswith("pop") and ops and is_seg[0]:
        return "pop_seg"
    if mnemonic.startswith("mov") and len(ops) == 2:
        if is_seg[0]:
            return "mov_from_seg"
        if is_seg[1]:
            return "mov_to_seg"
        if any(re.fullmatch(r"%cr\d+", o) for o in ops):
            return "mov_cr"
        if any(re.fullmatch(r"%db\d+", o) for o in ops):
            return "mov_dr"
        return None
    if mnemonic in _SIMPLE:
        return _SIMPLE[mnemonic]
    # size-suffixed forms: sgdtl pushfw popfq lretq iretw lcalll insb outsl ...
    for base, name in _SIMPLE.items():
        if re.fullmatch(base + r"[bwlq]", mnemonic) and base not in ("in", "out"):
            return name
    return None


def popek_sites(argv: list[str], capsys) -> set[tuple[int, str]]:
    code = main(["scan", "--format", "json", "--strategy", "linear", *argv])
    doc = json.loads(capsys.readouterr().out)
    assert code in (0, 1), doc
    (report,) = doc["files"]
    return {(int(f["address"], 16), f["name"]) for f in report["findings"]}


def _assemble(tmp_path: Path, name: str, flag: str) -> Path:
    obj = tmp_path / f"{name}.o"
    subprocess.run(["as", flag, "-o", str(obj), str(FIXTURES / f"{name}.s")], check=True, capture_output=True)
    return obj


def test_32bit_object(tmp_path, capsys):
    obj = _assemble(tmp_path, "system32", "--32")
    expected = objdump_sites(["-d", str(obj)])
    assert len(expected) >= 70
    assert popek_sites([str(obj)], capsys) == expected


def test_32bit_linked_executable(tmp_path, capsys):
    obj = _assemble(tmp_path, "system32", "--32")
    exe = tmp_path / "system32"
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x08049000", "-o", str(exe), str(obj)], check=True)
    expected = objdump_sites(["-d", str(exe)])
    assert min(a for a, _ in expected) >= 0x08049000
    assert popek_sites([str(exe)], capsys) == expected


def test_64bit_executable(tmp_path, capsys):
    obj = _assemble(tmp_path, "system64", "--64")
    exe = tmp_path / "system64"
    subprocess.run(["ld", "-o", str(exe), str(obj)], check=True)
    expected = objdump_sites(["-d", str(exe)])
    assert {"call_far", "jmp_far", "ret_far", "push_seg", "pop_seg"} <= {n for _, n in expected}
    assert popek_sites([str(exe)], capsys) == expected


def test_16bit_raw_code_with_base(tmp_path, capsys):
    obj = _assemble(tmp_path, "system16", "--32")
    flat = tmp_path / "system16.bin"
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(flat)], check=True)
    base = 0xF0000
    expected = objdump_sites(["-D", "-b", "binary", "-m", "i8086", f"--adjust-vma={base:#x}", str(flat)])
    assert len(expected) >= 35
    assert popek_sites(["--mode", "16", "--base", hex(base), str(flat)], capsys) == expected


def test_mixed_16_and_32_bit_regions(tmp_path, capsys):
    """Firmware mixes modes: each --region is decoded in its own mode."""
    parts = []
    for name in ("system16", "system32"):
        obj = _assemble(tmp_path, name, "--32")
        flat = tmp_path / f"{name}.bin"
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(flat)], check=True)
        parts.append(flat.read_bytes())
    image = tmp_path / "mixed.bin"
    image.write_bytes(parts[0] + parts[1])
    split = len(parts[0])
    expected = {(a, n) for a, n in objdump_sites(["-D", "-b", "binary", "-m", "i8086", str(tmp_path / "system16.bin")])}
    expected |= {(a + split, n) for a, n in objdump_sites(["-D", "-b", "binary", "-m", "i386", str(tmp_path / "system32.bin")])}
    got = popek_sites(["--region", f"0:{split:#x}:16", "--region", f"{split:#x}:{split + len(parts[1]):#x}:32",
                       str(image)], capsys)
    assert got == expected
