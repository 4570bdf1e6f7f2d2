"""Parsed operands + symbol values → concrete operands, and their canonical Keystone spelling.

Symbols are replaced by numbers before Keystone sees anything, so Keystone never resolves a name (its
own symbol handling and its MASM/NASM guesses stay out of the picture) and only receives text popek
rendered itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from popek.asm.expr import ExprError, FpuReg, Lookup, Sym, evaluate, first_column, linear
from popek.asm.parse import FarDirect, FarIndirect, Memory, String, Target, Value
from popek.asm.registers import ADDR16, Reg, register


@dataclass(frozen=True, slots=True)
class Imm:
    value: int


@dataclass(frozen=True, slots=True)
class Mem:
    size: str | None
    segment: Reg | None
    regs: tuple[tuple[str, int], ...]   # (register, coefficient), in source order
    disp: int

    @property
    def addr16(self) -> bool:
        return bool(self.regs) and all(r in ADDR16 for r, _ in self.regs)

    def address_text(self) -> str:
        """``[base + index*scale + disp]``, with at most one register of each role."""
        parts = []
        regs = _base_index(self.regs)
        if self.addr16:
            # Keystone gives [bp + si] a useless disp8 of 0 but encodes [si + bp] as GNU as does.
            regs.sort(key=lambda rc: rc[0] not in ("si", "di"))
        for name, coef in regs:
            parts.append(name if coef == 1 else f"{name}*{coef}")
        text = " + ".join(parts)
        if self.disp or not parts:
            sign = "-" if self.disp < 0 and parts else ""
            value = f"{abs(self.disp):#x}" if parts else f"{self.disp & 0xFFFFFFFF:#x}"
            text = f"{text} {sign or '+'} {value}" if parts else value
        seg = f"{self.segment.name}:" if self.segment else ""
        return f"{seg}[{text}]"

    def text(self) -> str:
        return (f"{self.size} ptr " if self.size else "") + self.address_text()


@dataclass(frozen=True, slots=True)
class Far:
    selector: int
    offset: int


@dataclass(frozen=True, slots=True)
class FarMem:
    mem: Mem


@dataclass(frozen=True, slots=True)
class Branch:
    """A branch target written with ``short`` or ``near``."""
    target: int
    distance: str


@dataclass(frozen=True, slots=True)
class St:
    index: int


Resolved = Union[Reg, Imm, Mem, Far, FarMem, Branch, St]


class OperandError(Exception):
    def __init__(self, message: str, column: int | None = None):
        super().__init__(message)
        self.message, self.column = message, column


def _base_index(regs: tuple[tuple[str, int], ...]) -> list[tuple[str, int]]:
    """Split ``{reg: coef}`` into base (coef 1) and index (coef 1, 2, 4, 8). ``eax*3`` is ``eax+eax*2``."""
    if len(regs) == 1 and regs[0][1] in (3, 5, 9):
        name, coef = regs[0]
        return [(name, 1), (name, coef - 1)]
    if len(regs) == 2 and regs[0][1] != 1 and regs[1][1] == 1:
        regs = (regs[1], regs[0])   # the unscaled one is the base
    if len(regs) == 2 and regs[1] == ("esp", 1):
        regs = (regs[1], regs[0])   # esp cannot be an index
    return list(regs)


def _check_address(regs: dict[str, int], column: int | None) -> None:
    coefs = sorted(regs.values())
    ok = (not regs or (len(regs) == 1 and coefs[0] in (1, 2, 3, 4, 5, 8, 9))
          or (len(regs) == 2 and coefs[0] == 1 and coefs[1] in (1, 2, 4, 8)))
    if not ok:
        raise OperandError("not an x86 address (base + index*1/2/4/8 + displacement)", column)
    if regs.get("esp", 1) != 1:
        raise OperandError("esp cannot be an index register", column)
    kinds = {register(r).kind for r in regs}
    sizes = {register(r).size for r in regs}
    if kinds - {"gpr"} or sizes - {16, 32} or len(sizes) > 1:
        raise OperandError("an address uses 32-bit (or 16-bit) general registers only", column)
    if 16 in sizes and (set(regs) - ADDR16 or any(k != 1 for k in regs.values())):
        raise OperandError("16-bit addresses use bx/bp with si/di, unscaled", column)


def resolve_memory(op: Memory, lookup: Lookup, here: int) -> Mem:
    col = first_column(op.address)
    regs, disp = linear(op.address, lookup, here)
    _check_address(regs, col)
    if not -(1 << 31) <= disp < (1 << 32):
        raise OperandError(f"displacement {disp:#x} does not fit in 32 bits", col)
    segment = None
    if op.segment is not None:
        segment = register(op.segment.name) if isinstance(op.segment, Sym) else None
        if segment is None or segment.kind != "sreg":
            raise OperandError("only a segment register may stand before ':' in an address", first_column(op.segment))
    return Mem(op.size, segment, tuple(regs.items()), disp)


def resolve(op, lookup: Lookup, here: int) -> Resolved:
    """One parsed operand → its concrete form. Raises OperandError / ExprError."""
    if isinstance(op, Value):
        e = op.expr
        if isinstance(e, Sym) and register(e.name):
            return register(e.name)
        if isinstance(e, FpuReg):
            return St(evaluate(e.index, lookup, here))
        return Imm(evaluate(e, lookup, here))
    if isinstance(op, Memory):
        return resolve_memory(op, lookup, here)
    if isinstance(op, FarDirect):
        return Far(evaluate(op.selector, lookup, here), evaluate(op.offset, lookup, here))
    if isinstance(op, FarIndirect):
        return FarMem(resolve_memory(op.memory, lookup, here))
    if isinstance(op, Target):
        return Branch(evaluate(op.expr, lookup, here), op.distance)
    if isinstance(op, String):
        raise OperandError("a string is not an instruction operand (use .ascii)")
    raise ExprError(f"cannot use {op!r} here")


def keystone_text(op: Resolved) -> str:
    """How Keystone should read the operand (Far/FarMem/Branch never reach Keystone)."""
    if isinstance(op, Reg):
        return op.name
    if isinstance(op, Imm):
        return f"-{-op.value:#x}" if op.value < 0 else f"{op.value:#x}"
    if isinstance(op, Mem):
        return op.text()
    if isinstance(op, St):
        return f"st({op.index})"
    raise AssertionError(f"{op!r} is encoded by popek, not Keystone")
