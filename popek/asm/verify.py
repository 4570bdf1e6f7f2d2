"""Decode every encoding back with Capstone and compare it with what the source asked for.

An encoding is accepted only if it decodes as exactly one instruction of the same length and the same
mnemonic (up to aliases: jz/je, pushad/pushal ...), carries no operand-size (0x66), address-size (0x67)
or segment prefix the source did not ask for, and keeps the branch target, the immediates (no silent
truncation) and the address (base, index*scale, displacement) of the source. This is what catches
Keystone's silent mistakes that the verified table does not cover.
"""
from __future__ import annotations

from dataclasses import dataclass

from capstone import x86

from popek.decode import decode_at, detail_at, opcode_and_modrm

# Condition codes: Capstone's name first, then the aliases the SDM allows.
CONDITIONS = [("o",), ("no",), ("b", "c", "nae"), ("ae", "nb", "nc"), ("e", "z"), ("ne", "nz"),
              ("be", "na"), ("a", "nbe"), ("s",), ("ns",), ("p", "pe"), ("np", "po"), ("l", "nge"),
              ("ge", "nl"), ("le", "ng"), ("g", "nle")]
CC_NUMBER = {alias: number for number, names in enumerate(CONDITIONS) for alias in names}

_ALIASES = {"sal": "shl", "pushad": "pushal", "pusha": "pushal", "popad": "popal", "popa": "popal",
            "pushf": "pushfd", "popf": "popfd", "iret": "iretd", "xlat": "xlatb", "fwait": "wait",
            "retn": "ret", "icebp": "int1", "loopz": "loope", "loopnz": "loopne",
            "repe": "rep", "repz": "rep", "repnz": "repne"}
for _names in CONDITIONS:
    for _alias in _names:
        for _stem in ("j", "set", "cmov"):
            _ALIASES[_stem + _alias] = _stem + _names[0]

BRANCHES = frozenset({"jmp", "call", "loop", "loope", "loopne", "loopz", "loopnz", "jcxz", "jecxz"}
                     | {"j" + a for a in CC_NUMBER})

_LEGACY = {0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65}
_SEGMENT = {0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x26: "es", 0x64: "fs", 0x65: "gs"}


def canonical(mnemonic: str) -> str:
    """One name per instruction, prefixes included: ``repz cmpsb`` → ``rep cmpsb``, ``jz`` → ``je``."""
    return " ".join(_ALIASES.get(w, w) for w in mnemonic.lower().split())


@dataclass(frozen=True)
class Expect:
    mnemonic: str                      # canonical, prefixes included
    mode: int
    allow_opsize: bool = False         # 0x66 was asked for (16-bit operand in 32-bit code, or the reverse)
    allow_addrsize: bool = False       # 0x67 was asked for
    segment: str | None = None         # segment override written in the source
    target: int | None = None          # branch target
    imms: tuple[int, ...] = ()         # immediates written in the source
    mem: tuple[dict, int] | None = None  # ({register: coefficient}, displacement)
    modrm_reg: int | None = None       # ModRM reg field a table row fixes


class VerifyError(Exception):
    pass


def _prefixes(code: bytes) -> list[int]:
    out = []
    for b in code:
        if b not in _LEGACY:
            break
        out.append(b)
    return out


def _survives(value: int, got: int, size: int) -> bool:
    """Whether the immediate ``value`` reads back as ``got`` from a field of ``size`` bytes."""
    if size == 0:               # implied by the opcode (the 1 of d0/d1 on memory: Capstone gives no size)
        return value == got
    bits = 8 * size
    return -(1 << (bits - 1)) <= value < (1 << bits) and (value - got) % (1 << bits) == 0


def verify(code: bytes, address: int, expect: Expect) -> None:
    """Raise VerifyError unless ``code`` is what ``expect`` describes."""
    mode = expect.mode
    insn = decode_at(code, 0, address, mode)
    if insn is None:
        raise VerifyError(f"the bytes {code.hex(' ')} do not decode")
    if insn.size != len(code):
        raise VerifyError(f"the bytes {code.hex(' ')} decode as '{insn.text}' ({insn.size} bytes) and more")
    if canonical(insn.mnemonic) != expect.mnemonic:
        raise VerifyError(f"the bytes {code.hex(' ')} decode as '{insn.text}'")
    prefixes = _prefixes(code)
    if 0x66 in prefixes and not expect.allow_opsize:
        raise VerifyError(f"spurious operand-size prefix 0x66 in {code.hex(' ')} ('{insn.text}' with the "
                          f"{'16' if mode == 32 else '32'}-bit operand size)")
    if 0x67 in prefixes and not expect.allow_addrsize:
        raise VerifyError(f"spurious address-size prefix 0x67 in {code.hex(' ')}")
    if any(b in _SEGMENT for b in prefixes) and expect.segment is None:
        raise VerifyError(f"unexpected segment prefix in {code.hex(' ')}")
    if expect.modrm_reg is not None:
        _, modrm = opcode_and_modrm(code, 0, mode)
        if modrm is None or (modrm >> 3) & 7 != expect.modrm_reg:
            raise VerifyError(f"ModRM reg field is not /{expect.modrm_reg} in {code.hex(' ')}")
    if expect.target is None and not expect.imms and expect.mem is None:
        return
    detail = detail_at(code, 0, address, mode)
    imms = [(op.imm, op.size) for op in detail.operands if op.type == x86.X86_OP_IMM]
    mask = (1 << mode) - 1
    if expect.target is not None:
        if not imms or imms[-1][0] & mask != expect.target & mask:
            raise VerifyError(f"branch goes to {insn.op_str}, not {expect.target:#x}")
    for value in expect.imms:
        if not any(_survives(value, got, size) for got, size in imms):
            raise VerifyError(f"immediate {value:#x} does not survive encoding ('{insn.text}')")
    if expect.mem is not None:
        mems = [op for op in detail.operands if op.type == x86.X86_OP_MEM]
        if not mems:
            raise VerifyError(f"'{insn.text}' has no memory operand")
        m = mems[0].mem
        got: dict[str, int] = {}
        for reg, k in ((m.base, 1), (m.index, m.scale)):
            if reg:
                name = detail.reg_name(reg)
                got[name] = got.get(name, 0) + k
        regs, disp = expect.mem
        width = 16 if 0x67 in prefixes and mode == 32 or (mode == 16 and 0x67 not in prefixes) else 32
        wmask = (1 << width) - 1
        if got != regs or (m.disp - disp) & wmask:
            raise VerifyError(f"address became '{insn.op_str}'")
        # An override of the default segment may be dropped (GNU as does too); any other may not.
        default = "ss" if detail.reg_name(m.base) in ("ebp", "esp", "bp", "sp") else "ds"
        if expect.segment and (detail.reg_name(m.segment) or default) != expect.segment:
            raise VerifyError(f"segment override lost ('{insn.text}')")
