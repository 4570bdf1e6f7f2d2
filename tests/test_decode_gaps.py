"""The Capstone-gap length table (popek.decode.CAPSTONE_GAPS), each entry checked against GNU objdump: every
ModRM byte of each opcode, bare and behind 66, F2, F3 and 67, in 16-, 32- and 64-bit mode, is stepped over at
objdump's length, so no false site (a ``jmp_far`` out of UD1's operand bytes) appears after it."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from popek.cli import main
from popek.decode import CAPSTONE_GAPS, sweep, sweep_records

pytestmark = pytest.mark.skipif(not shutil.which("objdump"), reason="GNU objdump not installed")

SLOT = 16
MACHINES = {16: "i8086", 32: "i386", 64: "i386:x86-64"}
PREFIXES = [b"", b"\x66", b"\xf2", b"\xf3", b"\x67"]


def _objdump_lengths(blob: bytes, mode: int, tmp_path) -> dict[int, tuple[int, str]]:
    flat = tmp_path / f"gaps{mode}.bin"
    flat.write_bytes(blob)
    out = subprocess.run(["objdump", "-D", "-w", "-b", "binary", "-m", MACHINES[mode], str(flat)], check=True,
                         capture_output=True, text=True).stdout
    lengths = {}
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\t([0-9a-f ]+)\t(.*)", line)
        if m and int(m.group(1), 16) % SLOT == 0:
            lengths[int(m.group(1), 16)] = (len(m.group(2).split()), m.group(3))
    return lengths


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_every_gap_entry_has_objdumps_length(mode, tmp_path):
    cases = [(opcode, prefix + opcode + bytes([modrm]) + b"\x25\x00\x00\x00")
             for opcode in CAPSTONE_GAPS for prefix in PREFIXES for modrm in range(256)]
    blob = b"".join(case + b"\x90" * (SLOT - len(case)) for _, case in cases)
    objdump = _objdump_lengths(blob, mode, tmp_path)
    ours = {a: size for a, size, _, _ in sweep(blob, 0, mode) if a % SLOT == 0}
    fast = {}
    for batch in sweep_records(blob, 0, mode):
        for i in range(len(batch.ids)):
            a, size = batch.address_size(i)
            if a % SLOT == 0:
                fast[a] = size
    assert ours == fast                      # the two sweeps agree
    wrong, checked = [], 0
    for k, (opcode, case) in enumerate(cases):
        length, text = objdump[k * SLOT]
        if "(bad)" in text:
            continue                         # objdump rejects the operand form: no length to compare with
        checked += 1
        if ours.get(k * SLOT) != length:
            wrong.append(f"{case[:8].hex(' ')}: popek {ours.get(k * SLOT)}, objdump {length} ({text})")
    assert checked > len(cases) // 2
    assert not wrong, f"{len(wrong)} of {checked} wrong:\n" + "\n".join(wrong[:30])


def test_ud1_operand_bytes_are_not_a_far_jump(tmp_path, capsys):
    """0f b9 00 00 ea 00 00 00 00 ff 0f: Capstone decodes UD1 without its ModRM and then sees ``ljmp`` in the operands."""
    flat = tmp_path / "ud1.bin"
    flat.write_bytes(bytes.fromhex("0fb90000ea00000000ff0f"))
    assert main(["scan", "--format", "json", "--mode", "32", "--base", "0", str(flat)]) == 0
    assert json.loads(capsys.readouterr().out)["files"][0]["findings"] == []
