"""Routines for the sensitive-unprivileged instructions that read or write state: sgdt sidt sldt str smsw,
pushf popf, push/pop/mov of segment registers, lar lsl verr verw, each at the virtual CPL. Unmodified at
the deprivileged ring they show the real machine; these show what the bare machine would."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from popek.machine.descriptors import Descriptor
from popek.machine.faults import GP, NP, SS, UD, GuestFault
from popek.machine.memory import AddressSpace
from popek.monitors.emulation.access import address, get_reg, peek, push, read, set_reg, umip, write, zf
from popek.monitors.emulation.recipe import MEM, REG, Recipe
from popek.monitors.vcpu import IF, IOPL, NT, RF, VM, VCpu

if TYPE_CHECKING:
    from popek.machine.machine import Machine

AC, ID = 1 << 18, 1 << 21


# --- sensitive registers: the stores and the flags ------------------------------------------------------------
def _store_table(m: Machine, v: VCpu, r: Recipe, table: tuple[int, int]) -> int:
    umip(v, r)
    space = v.space(m)
    base, limit = table
    space.write(address(m, v, r, r.operands[0], space), struct.pack("<HI", limit & 0xFFFF, base))
    return r.next


def sgdt(m: Machine, v: VCpu, r: Recipe) -> int:
    return _store_table(m, v, r, v.gdtr)


def sidt(m: Machine, v: VCpu, r: Recipe) -> int:
    return _store_table(m, v, r, v.idtr)


def _store_word(m: Machine, v: VCpu, r: Recipe, value: int) -> int:
    """sldt/str/smsw: a register destination takes the value zero-extended to its size (a 16-bit
    register keeps its upper half); memory takes 16 bits."""
    umip(v, r)
    op = r.operands[0]
    write(m, v, r, op, value, v.space(m), 2 if op.kind == MEM else op.size)
    return r.next


def sldt(m: Machine, v: VCpu, r: Recipe) -> int:
    return _store_word(m, v, r, v.ldtr.selector & 0xFFFF)


def str_(m: Machine, v: VCpu, r: Recipe) -> int:
    return _store_word(m, v, r, v.tr.selector & 0xFFFF)


def smsw(m: Machine, v: VCpu, r: Recipe) -> int:
    """The low word of CR0. Into a 32-bit register the bare machine (Unicorn 2.1.4) writes those 16 bits and
    keeps the register's upper half (the SDM leaves it undefined), unlike sldt and str, which zero-extend."""
    op = r.operands[0]
    if op.kind == REG and op.size == 4:
        umip(v, r)
        set_reg(m, op.reg, (get_reg(m, op.reg) & 0xFFFF0000) | (v.cr0 & 0xFFFF))
        return r.next
    return _store_word(m, v, r, v.cr0 & 0xFFFF)


def pushf(m: Machine, v: VCpu, r: Recipe) -> int:
    value = v.eflags(m.reg("eflags")) & ~(RF | VM)
    push(m, v, v.space(m), [value], r.opsize)
    return r.next


# POPF (SDM Vol. 2B): what a popped EFLAGS may change, by privilege. RF is cleared; VM, VIP, VIF are kept.
POPF_ALWAYS = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 0x800 | NT | AC | ID


def popf(m: Machine, v: VCpu, r: Recipe) -> int:
    (value,) = peek(m, v, v.space(m), 1, r.opsize)
    changeable = POPF_ALWAYS | (IF if v.cpl <= v.iopl else 0) | (IOPL if v.cpl == 0 else 0)
    if r.opsize == 2:
        changeable &= 0xFFFF
    old = v.eflags(m.reg("eflags"))
    new = ((old & ~changeable) | (value & changeable) | 2) & ~RF
    m.set_reg("esp", (m.reg("esp") + r.opsize) & 0xFFFFFFFF)
    m.set_reg("eflags", v.set_eflags(new))
    return r.next


# --- segment registers -------------------------------------------------------------------------------------
def _visible(v: VCpu, sreg: str, selector: int) -> int:
    """What the guest reads from a segment register: CS and SS carry its virtual CPL."""
    return (selector & 0xFFFC) | v.cpl if sreg in ("cs", "ss") else selector


def push_seg(m: Machine, v: VCpu, r: Recipe) -> int:
    sreg = r.operands[0].reg
    push(m, v, v.space(m), [_visible(v, sreg, m.reg(sreg))], r.opsize)
    return r.next


def mov_from_seg(m: Machine, v: VCpu, r: Recipe) -> int:
    dst, src = r.operands
    value = _visible(v, src.reg, m.reg(src.reg))
    write(m, v, r, dst, value, v.space(m), 2 if dst.kind == MEM else dst.size)
    return r.next


def check_segment(m: Machine, v: VCpu, space: AddressSpace, sreg: str, selector: int) -> Descriptor | None:
    """The checks of MOV/POP to a segment register at the virtual CPL (SDM Vol. 2A MOV, "IF SS is loaded"
    and "IF DS, ES, FS, or GS is loaded"); the descriptor, or None for a null selector in DS-GS."""
    error = selector & 0xFFFC
    if sreg == "cs":
        raise GuestFault(UD, None, "mov to CS")
    if error == 0 and not selector & 4:
        if sreg == "ss":
            raise GuestFault(GP, 0, "null selector loaded into SS")
        return None
    desc = space.descriptor(selector, GP, error)
    rpl, dpl = selector & 3, desc.dpl
    if sreg == "ss":
        if rpl != v.cpl or dpl != v.cpl or not desc.writable_data:
            raise GuestFault(GP, error, f"selector {selector:#x} is not a writable DPL-{v.cpl} stack")
        if not desc.present:
            raise GuestFault(SS, error, f"stack segment {selector:#x} not present")
        return desc
    readable = desc.is_code and desc.type & 2
    if desc.system or (desc.is_code and not readable):
        raise GuestFault(GP, error, f"selector {selector:#x} is not data or readable code")
    if not desc.conforming and (rpl > dpl or v.cpl > dpl):
        raise GuestFault(GP, error, f"selector {selector:#x}: DPL {dpl} < max(CPL {v.cpl}, RPL {rpl})")
    if not desc.present:
        raise GuestFault(NP, error, f"segment {selector:#x} not present")
    return desc


def load_segment(m: Machine, v: VCpu, sreg: str, selector: int) -> None:
    """Load a checked selector into the real register (SS with the real ring as its RPL)."""
    m.set_reg(sreg, v.real_selector(selector, v.cpl) if sreg == "ss" else selector)


def mov_to_seg(m: Machine, v: VCpu, r: Recipe) -> int:
    dst, src = r.operands
    space = v.space(m)
    selector = read(m, v, r, src, space, 2)
    check_segment(m, v, space, dst.reg, selector)
    load_segment(m, v, dst.reg, selector)
    return r.next


def pop_seg(m: Machine, v: VCpu, r: Recipe) -> int:
    sreg = r.operands[0].reg
    space = v.space(m)
    (selector,) = peek(m, v, space, 1, r.opsize)
    selector &= 0xFFFF
    check_segment(m, v, space, sreg, selector)
    m.set_reg("esp", (m.reg("esp") + r.opsize) & 0xFFFFFFFF)
    load_segment(m, v, sreg, selector)
    return r.next


# --- lar, lsl, verr, verw: the guest's own descriptors at the virtual CPL --------------------------------------
_LAR_SYSTEM = frozenset({1, 2, 3, 4, 5, 9, 11, 12})
_LSL_SYSTEM = frozenset({1, 2, 3, 9, 11})


def _visible_descriptor(m: Machine, v: VCpu, space: AddressSpace, selector: int,
                        system_types: frozenset[int] = frozenset()) -> Descriptor | None:
    """The descriptor if the CPU would let the program see it (ZF=1), else None (ZF=0)."""
    if selector & 0xFFFC == 0 and not selector & 4:
        return None
    try:
        at = space.descriptor_address(selector, GP, 0)
    except GuestFault:
        return None                             # beyond the table limit: ZF = 0, no fault
    desc = Descriptor.from_bytes(space.read(at, 8))
    if desc.system and desc.type not in system_types:
        return None
    if not desc.conforming and desc.dpl < max(v.cpl, selector & 3):
        return None
    return desc


def lar(m: Machine, v: VCpu, r: Recipe) -> int:
    dst, src = r.operands
    space = v.space(m)
    desc = _visible_descriptor(m, v, space, read(m, v, r, src, space, 2), _LAR_SYSTEM)
    if desc is not None:
        set_reg(m, dst.reg, desc.high & (0x00F0FF00 if dst.size == 4 else 0xFF00))
    zf(m, desc is not None)
    return r.next


def lsl(m: Machine, v: VCpu, r: Recipe) -> int:
    dst, src = r.operands
    space = v.space(m)
    desc = _visible_descriptor(m, v, space, read(m, v, r, src, space, 2), _LSL_SYSTEM)
    if desc is not None:
        set_reg(m, dst.reg, desc.limit)
    zf(m, desc is not None)
    return r.next


def _verify(m: Machine, v: VCpu, r: Recipe, writing: bool) -> int:
    space = v.space(m)
    desc = _visible_descriptor(m, v, space, read(m, v, r, r.operands[0], space, 2))
    if desc is not None:
        ok = desc.writable_data if writing else (not desc.is_code or bool(desc.type & 2))
    else:
        ok = False
    zf(m, ok)
    return r.next


def verr(m: Machine, v: VCpu, r: Recipe) -> int:
    return _verify(m, v, r, False)


def verw(m: Machine, v: VCpu, r: Recipe) -> int:
    return _verify(m, v, r, True)
