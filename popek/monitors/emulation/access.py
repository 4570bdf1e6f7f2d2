"""What the routines read and write: guest registers (with 8- and 16-bit parts), operands, memory through
the guest's segments and paging, the stack; and the privilege checks they share."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from popek.machine.faults import GP, SS, GuestFault
from popek.machine.memory import AddressSpace
from popek.monitors.emulation.recipe import IMM, MEM, SREG, Operand, Recipe
from popek.monitors.vcpu import VCpu

if TYPE_CHECKING:
    from popek.machine.machine import Machine

ZF = 1 << 6
CR4_UMIP = 1 << 11


_SUB = {}
for _r in "abcd":
    _SUB[f"{_r}l"], _SUB[f"{_r}h"], _SUB[f"{_r}x"] = (f"e{_r}x", 0, 0xFF), (f"e{_r}x", 8, 0xFF), (f"e{_r}x", 0, 0xFFFF)
for _r in ("si", "di", "sp", "bp"):
    _SUB[_r] = (f"e{_r}", 0, 0xFFFF)


def get_reg(m: Machine, name: str) -> int:
    sub = _SUB.get(name)
    if sub is None:
        return m.reg(name)
    full, shift, mask = sub
    return (m.reg(full) >> shift) & mask


def set_reg(m: Machine, name: str, value: int) -> None:
    sub = _SUB.get(name)
    if sub is None:
        m.set_reg(name, value & 0xFFFFFFFF)
        return
    full, shift, mask = sub
    m.set_reg(full, (m.reg(full) & ~(mask << shift)) | ((value & mask) << shift))


def address(m: Machine, v: VCpu, r: Recipe, op: Operand, space: AddressSpace) -> int:
    """The linear address of a memory operand."""
    offset = op.disp
    if op.base:
        offset += get_reg(m, op.base)
    if op.index:
        offset += get_reg(m, op.index) * op.scale
    offset &= 0xFFFFFFFF if r.addrsize == 4 else 0xFFFF
    return (v.segment_base(m, op.seg) + offset) & 0xFFFFFFFF


def read(m: Machine, v: VCpu, r: Recipe, op: Operand, space: AddressSpace, size: int | None = None) -> int:
    size = size or op.size
    if op.kind == MEM:
        return int.from_bytes(space.read(address(m, v, r, op, space), size), "little")
    if op.kind == IMM:
        return op.number
    if op.kind == SREG:
        return m.reg(op.reg)
    return get_reg(m, op.reg) & ((1 << (8 * size)) - 1)


def write(m: Machine, v: VCpu, r: Recipe, op: Operand, value: int, space: AddressSpace,
          size: int | None = None) -> None:
    size = size or op.size
    if op.kind == MEM:
        space.write(address(m, v, r, op, space), (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
    else:
        set_reg(m, op.reg, value)


def _stack_base(m: Machine, v: VCpu, space: AddressSpace) -> int:
    return v.segment_base(m, "ss")


def push(m: Machine, v: VCpu, space: AddressSpace, words: list[int], width: int) -> None:
    """Push ``words`` in order (the last ends up on top); a fault leaves ESP unchanged (#SS(0))."""
    esp = (m.reg("esp") - width * len(words)) & 0xFFFFFFFF
    mask = (1 << (8 * width)) - 1
    data = struct.pack(f"<{len(words)}{'I' if width == 4 else 'H'}", *(w & mask for w in reversed(words)))
    space.write((_stack_base(m, v, space) + esp) & 0xFFFFFFFF, data, fault=(SS, 0))
    m.set_reg("esp", esp)


def peek(m: Machine, v: VCpu, space: AddressSpace, count: int, width: int, skip: int = 0) -> list[int]:
    """``count`` stack slots from ESP + ``skip`` bytes, top first; ESP is not changed."""
    at = (_stack_base(m, v, space) + m.reg("esp") + skip) & 0xFFFFFFFF
    try:
        data = space.read(at, count * width)
    except GuestFault as fault:
        raise GuestFault(SS, 0, fault.why, fault.address) from None
    return list(struct.unpack(f"<{count}{'I' if width == 4 else 'H'}", data))


def flags(m: Machine, set_mask: int = 0, clear_mask: int = 0) -> None:
    m.set_reg("eflags", (m.reg("eflags") & ~clear_mask) | set_mask)


def zf(m: Machine, ok: bool) -> None:
    flags(m, ZF, 0) if ok else flags(m, 0, ZF)


# --- privilege checks --------------------------------------------------------------------------------------
def cpl0(v: VCpu, r: Recipe) -> None:
    if v.cpl:
        raise GuestFault(GP, 0, f"{r.name} at CPL {v.cpl}")


def iopl_check(v: VCpu, r: Recipe) -> None:
    if v.cpl > v.iopl:
        raise GuestFault(GP, 0, f"{r.name} at CPL {v.cpl} > IOPL {v.iopl}")


def umip(v: VCpu, r: Recipe) -> None:
    if v.cr4 & CR4_UMIP and v.cpl:
        raise GuestFault(GP, 0, f"{r.name} at CPL {v.cpl} with CR4.UMIP")


def io_allowed(m: Machine, v: VCpu, port: int, size: int) -> None:
    if not v.io_permitted(m, port, size):
        raise GuestFault(GP, 0, f"port {port:#x} at CPL {v.cpl} > IOPL {v.iopl}")
