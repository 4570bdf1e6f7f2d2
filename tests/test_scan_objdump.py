"""`popek scan --strategy linear` finds exactly the sites GNU objdump's disassembly shows.

The oracle is independent of popek: GNU as builds the binaries, objdump disassembles them (AT&T syntax), and
the small table below maps objdump's mnemonics and operands to canonical names. For each binary the set of
(address, canonical name) must be equal.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from popek.cli import main
from popek.experiments.objdump_oracle import objdump_sites

FIXTURES = Path(__file__).parent / "fixtures" / "asm"
pytestmark = pytest.mark.skipif(not (shutil.which("as") and shutil.which("objdump") and shutil.which("ld")),
                                reason="GNU binutils (as, ld, objdump) not installed")

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
