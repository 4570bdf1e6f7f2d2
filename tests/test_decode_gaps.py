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


def test_x87_aliases_are_decoded_at_the_length_the_cpu_executes():
    """Unicorn is the oracle here (objdump rejects these too): every register form of D8-DF that Capstone
    rejects either executes as a two-byte alias, which the decoder must step over as one instruction, or is
    #UD, which must stay undecodable."""
    import capstone
    import unicorn
    from unicorn.x86_const import UC_X86_REG_EIP

    from popek.decode import X87_ALIASES, decode_at
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    runs, invalid = [], []
    for opcode in range(0xD8, 0xE0):
        for modrm in range(0xC0, 0x100):
            code = bytes([opcode, modrm, 0xF4])
            if [size for _, size, _, _ in md.disasm_lite(code, 0, 1)] == [2]:
                continue                    # Capstone decodes it: not a gap
            uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
            uc.mem_map(0, 0x2000)
            uc.mem_write(0x1000, code)
            try:
                uc.emu_start(0x1000, 0, count=1)
                assert uc.reg_read(UC_X86_REG_EIP) == 0x1002
                runs.append(code)
            except unicorn.UcError as e:
                assert e.errno == unicorn.UC_ERR_INSN_INVALID
                invalid.append(code)
    assert len(runs) == 56 and len(invalid) == 92
    for code in runs:
        insn = decode_at(code, 0, 0, 32)
        assert insn is not None and insn.size == 2
        assert insn.mnemonic == X87_ALIASES[code[0], code[1] & 0xF8]
        assert [s for _, s, _, _ in sweep(b"\x66" + code, 0, 32)][0] == 3       # behind a prefix too
        assert [b.address_size(0)[1] for b in sweep_records(code, 0, 32)][0] == 2
    assert all(decode_at(code, 0, 0, 32) is None for code in invalid)
