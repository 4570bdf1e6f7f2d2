"""Recipes: an instruction decoded once (Capstone detail, classified by the ISA description) into what its
emulation routine needs, and ``Recipes``, the per-EIP cache that checks the bytes on every use.

``decode(raw, address)`` gives the canonical name (DESIGN §3.1), length, operand- and address-size
attributes, ``rep``, and ``Operand`` records (register names, immediates, memory operands as
segment/base/index/scale/displacement). ``Recipes.get`` returns the recipe for CS:EIP after one raw read
compares the cached bytes with guest memory (0.5 µs), so self-modifying code never runs a stale recipe and
nothing is decoded on the hot path.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

from capstone import x86_const as C
from unicorn.unicorn_py3.unicorn import uclib

from popek.decode import detail_at
from popek.machine.faults import GuestFault
from popek.machine.memory import CR0_PG

if TYPE_CHECKING:
    from popek.machine.machine import Machine
    from popek.monitors.vcpu import VCpu

REG, SREG, CR, DR, MEM, IMM = "reg", "sreg", "cr", "dr", "mem", "imm"


@dataclass(frozen=True, slots=True)
class Operand:
    """One operand. REG: ``reg`` is a general register name (eax, ax, al, ah...); SREG: cs..gs; CR/DR:
    ``number``; IMM: ``number`` is the value; MEM: ``seg`` (the effective segment register), ``base``,
    ``index`` (register names or ""), ``scale``, ``disp``. ``size`` is in bytes."""

    kind: str
    size: int
    reg: str = ""
    number: int = 0
    seg: str = ""
    base: str = ""
    index: str = ""
    scale: int = 1
    disp: int = 0


@dataclass(frozen=True, slots=True)
class Recipe:
    """An instruction decoded once: what its emulation routine needs, and nothing it must decode again."""

    name: str                       # canonical name (DESIGN §3.1)
    address: int                    # EIP of the instruction
    size: int
    raw: bytes
    text: str                       # Intel syntax, for messages
    operands: tuple[Operand, ...]
    opsize: int                     # operand-size attribute, 2 or 4 bytes
    addrsize: int                   # address-size attribute, 2 or 4 bytes
    rep: bool                       # a rep/repe/repne prefix
    next: int                       # address + size


def classifier():
    from popek.isa import bundled_classifier
    return bundled_classifier(extended=True)


def decode(raw: bytes, address: int) -> Recipe | None:
    """The recipe for the instruction at the start of ``raw`` (32-bit code), or None if it does not decode
    or is not one the ISA description names."""
    insn = detail_at(raw, 0, address, 32)
    if insn is None:
        return None
    entry = classifier().lookup(raw, 0, 32, insn.mnemonic, insn.op_str)
    if entry is None:
        return None
    prefix = insn.prefix
    operands = tuple(_operand(insn, op) for op in insn.operands)
    return Recipe(entry.name, address, insn.size, bytes(raw[:insn.size]), f"{insn.mnemonic} {insn.op_str}".strip(),
                  operands, 2 if prefix[2] == 0x66 else 4, 2 if prefix[3] == 0x67 else 4,
                  prefix[0] in (0xF2, 0xF3), address + insn.size)


def _operand(insn, op) -> Operand:
    if op.type == C.X86_OP_IMM:
        return Operand(IMM, op.size, number=op.imm & 0xFFFFFFFF)
    if op.type == C.X86_OP_REG:
        name = insn.reg_name(op.reg)
        if name in _SREGS:
            return Operand(SREG, 2, reg=name)
        if name.startswith("cr"):
            return Operand(CR, 4, reg=name, number=int(name[2:]))
        if name.startswith("dr"):
            return Operand(DR, 4, reg=name, number=int(name[2:]))
        return Operand(REG, op.size, reg=name)
    m = op.mem
    base = insn.reg_name(m.base) if m.base else ""
    index = insn.reg_name(m.index) if m.index else ""
    seg = insn.reg_name(m.segment) if m.segment else ("ss" if base in ("esp", "ebp", "sp", "bp") else "ds")
    return Operand(MEM, op.size, seg=seg, base=base, index=index, scale=m.scale, disp=m.disp)


_SREGS = frozenset({"cs", "ds", "es", "fs", "gs", "ss"})


def port_access(r: Recipe, dx: int) -> tuple[int, int, bool]:
    """(port, bytes per access, inbound) of an in/out/ins/outs recipe; ``dx``: the guest's DX, the port
    of every form but ``in``/``out`` with an immediate."""
    inbound = r.name in ("in", "ins")
    if r.name in ("in", "out"):
        data, port = (r.operands[0], r.operands[1]) if inbound else (r.operands[1], r.operands[0])
        return (port.number if port.kind == IMM else dx & 0xFFFF), data.size, inbound
    return dx & 0xFFFF, (r.operands[0] if inbound else r.operands[1]).size, inbound


class Recipes:
    """Recipes by EIP, checked against the guest's bytes at CS:EIP on every use (one raw read)."""

    def __init__(self):
        # EIP -> (bytes, their length, the recipe or None when they decode to no named instruction)
        self._by_eip: dict[int, tuple[bytes, int, Recipe | None]] = {}
        self._buf = ctypes.create_string_buffer(16)
        self.decoded = 0

    def get(self, m: Machine, v: VCpu, eip: int, cs_base: int = 0) -> Recipe | None:
        """The recipe for the instruction at CS:EIP now (``cs_base``: the base of CS), or None (not
        decodable, or not one the ISA description names)."""
        linear = (cs_base + eip) & 0xFFFFFFFF
        known = self._by_eip.get(eip)
        if known is not None:
            raw, size, recipe = known
            if v.cr0 & CR0_PG:
                if _fetch(m, v, linear, size) == raw:
                    return recipe
            elif not _mem_read(m.uc._uch, linear, self._buf, size) and self._buf.raw[:size] == raw:
                return recipe           # the hot path: one raw read, 0.5 µs (through Memory.read, 1 µs)
        code = _fetch(m, v, linear, 15)
        recipe = decode(code, eip) if code else None
        if code:
            raw = recipe.raw if recipe is not None else code
            self._by_eip[eip] = (raw, len(raw), recipe)
        self.decoded += 1
        return recipe


_mem_read = uclib.uc_mem_read


def _fetch(m: Machine, v: VCpu, linear: int, size: int) -> bytes:
    """Up to ``size`` bytes of code at ``linear`` (fewer at the end of readable memory)."""
    while size:
        try:
            if v.cr0 & CR0_PG:
                return v.space(m, mark=False).read(linear, size)
            return m.memory.read(linear, size)
        except GuestFault:
            size -= 1
    return b""
