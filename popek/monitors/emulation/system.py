"""Routines for the privileged and I/O instructions: descriptor-table and task registers, control and debug
registers, caches, MSRs, hlt, IF, port I/O. At the deprivileged ring they all fault, so trap-and-emulate
runs each of them here."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from popek.machine import xsave
from popek.machine.descriptors import Descriptor
from popek.machine.faults import GP, NP, UD, GuestFault
from popek.machine.memory import AddressSpace
from popek.monitors.emulation.access import (address, cpl0, flags, get_reg, io_allowed, iopl_check, read,
                                             set_reg)
from popek.monitors.emulation.recipe import CR, DR, IMM, Operand, Recipe
from popek.monitors.vcpu import IF, VCpu

if TYPE_CHECKING:
    from popek.machine.machine import Machine

CR0_PE, CR0_TS, CR0_ET = 1, 8, 0x10
CR0_PG = 1 << 31
CR4_TSD, CR4_DE = 1 << 2, 1 << 3


# --- privileged: descriptor tables, control and debug registers, caches, MSRs -----------------------------
def _load_table(m: Machine, v: VCpu, r: Recipe) -> tuple[int, int]:
    cpl0(v, r)
    space = v.space(m)
    limit, base = struct.unpack("<HI", space.read(address(m, v, r, r.operands[0], space), 6))
    return base & (0xFFFFFFFF if r.opsize == 4 else 0xFFFFFF), limit


def lgdt(m: Machine, v: VCpu, r: Recipe) -> int:
    v.gdtr = _load_table(m, v, r)
    v.changed("gdtr")
    return r.next


def lidt(m: Machine, v: VCpu, r: Recipe) -> int:
    v.idtr = _load_table(m, v, r)
    v.changed("idtr")
    return r.next


def _system_descriptor(m: Machine, v: VCpu, space: AddressSpace, selector: int) -> tuple[Descriptor, int]:
    """The GDT entry for lldt/ltr; #GP(selector) for an LDT selector or one beyond the GDT."""
    if selector & 4:
        raise GuestFault(GP, selector & 0xFFFC, f"selector {selector:#x} is in the LDT")
    at = space.descriptor_address(selector, GP, selector & 0xFFFC)
    return Descriptor.from_bytes(space.read(at, 8)), at


def lldt(m: Machine, v: VCpu, r: Recipe) -> int:
    cpl0(v, r)
    space = v.space(m)
    selector = read(m, v, r, r.operands[0], space, 2)
    if selector & 0xFFFC == 0:
        v.ldtr = type(v.ldtr)(selector, 0, 0)
    else:
        desc, _ = _system_descriptor(m, v, space, selector)
        if not desc.system or desc.type != 2:
            raise GuestFault(GP, selector & 0xFFFC, f"selector {selector:#x} is not an LDT")
        if not desc.present:
            raise GuestFault(NP, selector & 0xFFFC, f"LDT {selector:#x} not present")
        v.ldtr = type(v.ldtr)(selector, desc.base, desc.limit)
    v.changed("ldtr")
    return r.next


def ltr(m: Machine, v: VCpu, r: Recipe) -> int:
    cpl0(v, r)
    space = v.space(m)
    selector = read(m, v, r, r.operands[0], space, 2)
    if selector & 0xFFFC == 0:
        # The bare machine (Unicorn, after QEMU) loads an invalid TR here; the SDM says #GP(0).
        v.tr = type(v.tr)(selector, 0, 0)
        v.changed("tr")
        return r.next
    desc, at = _system_descriptor(m, v, space, selector)
    if not desc.system or desc.type not in (1, 9):
        raise GuestFault(GP, selector & 0xFFFC, f"selector {selector:#x} is not an available TSS")
    if not desc.present:
        raise GuestFault(NP, selector & 0xFFFC, f"TSS {selector:#x} not present")
    space.write(at + 4, struct.pack("<I", desc.high | (2 << 8)))       # busy, as the CPU marks it
    v.tr = type(v.tr)(selector, desc.base, desc.limit)
    v.changed("tr")
    return r.next


def _set_cr0(v: VCpu, value: int) -> None:
    # ET is hardwired to 1. The bare machine (Unicorn) accepts NW without CD and reserved bits; it does
    # not check PG without PE either, and ends up in a state it cannot run: that one is the SDM's #GP(0).
    value = (value | CR0_ET) & 0xFFFFFFFF
    if value & CR0_PG and not value & CR0_PE:
        raise GuestFault(GP, 0, "CR0.PG without CR0.PE")
    v.cr0 = value
    v.changed("cr0")


def lmsw(m: Machine, v: VCpu, r: Recipe) -> int:
    cpl0(v, r)
    value = read(m, v, r, r.operands[0], v.space(m), 2)
    # Only PE, MP, EM and TS; PE can be set but not cleared.
    _set_cr0(v, (v.cr0 & ~0xE) | (value & 0xF) | (v.cr0 & CR0_PE))
    return r.next


def clts(m: Machine, v: VCpu, r: Recipe) -> int:
    cpl0(v, r)
    _set_cr0(v, v.cr0 & ~CR0_TS)
    return r.next


def mov_cr(m: Machine, v: VCpu, r: Recipe) -> int:
    cpl0(v, r)
    dst, src = r.operands
    if dst.kind == CR:
        value = get_reg(m, src.reg)
        if dst.number == 0:
            _set_cr0(v, value)
        elif dst.number == 2:
            v.cr2 = value
            v.changed("cr2")
        elif dst.number == 3:
            v.cr3 = value
            v.changed("cr3")
        elif dst.number == 4:
            v.cr4 = value                       # the bare machine keeps reserved bits too (measured)
            v.changed("cr4")
        else:
            raise GuestFault(UD, None, f"no CR{dst.number}")
    else:
        value = {0: v.cr0, 2: v.cr2, 3: v.cr3, 4: v.cr4}.get(src.number)
        if value is None:
            raise GuestFault(UD, None, f"no CR{src.number}")
        set_reg(m, dst.reg, value)
    return r.next


def _dr_index(v: VCpu, n: int) -> int:
    if n in (4, 5):
        if v.cr4 & CR4_DE:
            raise GuestFault(UD, None, f"DR{n} with CR4.DE")
        return n + 2
    return n


def mov_dr(m: Machine, v: VCpu, r: Recipe) -> int:
    cpl0(v, r)
    dst, src = r.operands
    if dst.kind == DR:
        n = _dr_index(v, dst.number)
        value = get_reg(m, src.reg)
        # DR6 and DR7 keep their always-one bits (Unicorn, measured).
        v.dr[n] = value | 0xFFFF0FF0 if n == 6 else value | 0x400 if n == 7 else value
    else:
        set_reg(m, dst.reg, v.dr[_dr_index(v, src.number)])
    return r.next


def invlpg(m: Machine, v: VCpu, r: Recipe) -> int:
    cpl0(v, r)
    v.changed("tlb")
    return r.next


def cache(m: Machine, v: VCpu, r: Recipe) -> int:
    """wbinvd, invd: no caches are modelled; only the privilege check remains."""
    cpl0(v, r)
    return r.next


def msr_value(m: Machine, v: VCpu, number: int) -> int:
    value = v.msr.get(number)
    return m.uc.msr_read(number) if value is None else value


def rdmsr(m: Machine, v: VCpu, r: Recipe) -> int:
    cpl0(v, r)
    value = msr_value(m, v, m.reg("ecx"))
    m.set_reg("eax", value & 0xFFFFFFFF)
    m.set_reg("edx", (value >> 32) & 0xFFFFFFFF)
    return r.next


def wrmsr(m: Machine, v: VCpu, r: Recipe) -> int:
    # Kept virtual: the SYSENTER MSRs, for one, must not reach the real CPU, which would enter ring 0.
    cpl0(v, r)
    v.msr[m.reg("ecx")] = (m.reg("edx") << 32) | m.reg("eax")
    return r.next


TSC_AUX = 0xC0000103        # IA32_TSC_AUX: what rdtscp loads into ECX


def rdtsc(m: Machine, v: VCpu, r: Recipe) -> int:
    """Traps only when the guest sets CR4.TSD; ``bt`` calls it for every rdtsc. The count is the machine's
    time as the instruction sees it (one tick per guest instruction, itself included, as the PIT counts),
    the value the bare machine gives where Unicorn's own TSC follows the host clock (quirks:
    tsc-from-host-clock)."""
    if v.cr4 & CR4_TSD:
        cpl0(v, r)
    value = m.now() & 0xFFFFFFFFFFFFFFFF
    m.set_reg("eax", value & 0xFFFFFFFF)
    m.set_reg("edx", (value >> 32) & 0xFFFFFFFF)
    return r.next


def rdtscp(m: Machine, v: VCpu, r: Recipe) -> int:
    """rdtsc, and IA32_TSC_AUX in ECX (SDM Vol. 2B, RDTSCP)."""
    next_ip = rdtsc(m, v, r)
    m.set_reg("ecx", msr_value(m, v, TSC_AUX) & 0xFFFFFFFF)
    return next_ip


def hlt(m: Machine, v: VCpu, r: Recipe) -> int:
    cpl0(v, r)
    m.halt()            # the run loop waits for an interrupt the virtual IF allows, or ends the run
    return r.next


def cli(m: Machine, v: VCpu, r: Recipe) -> int:
    iopl_check(v, r)
    v.iflag = 0
    if not v.ring:
        flags(m, 0, IF)
    return r.next


def sti(m: Machine, v: VCpu, r: Recipe) -> int:
    iopl_check(v, r)
    v.iflag = 1
    if not v.ring:
        flags(m, IF)
    return r.next


# --- port I/O ---------------------------------------------------------------------------------------------
def _port(m: Machine, op: Operand) -> int:
    return op.number if op.kind == IMM else m.reg("edx") & 0xFFFF


def in_(m: Machine, v: VCpu, r: Recipe) -> int:
    dst, src = r.operands
    port = _port(m, src)
    io_allowed(m, v, port, dst.size)
    set_reg(m, dst.reg, m.port_read(port, dst.size))
    return r.next


def out(m: Machine, v: VCpu, r: Recipe) -> int:
    dst, src = r.operands
    port = _port(m, dst)
    io_allowed(m, v, port, src.size)
    m.port_write(port, src.size, get_reg(m, src.reg))
    return r.next


def _string_io(m: Machine, v: VCpu, r: Recipe, inbound: bool) -> int:
    mem = r.operands[0] if inbound else r.operands[1]
    size, port = mem.size, m.reg("edx") & 0xFFFF
    io_allowed(m, v, port, size)
    space = v.space(m)
    index = "edi" if inbound else "esi"
    step = -size if m.reg("eflags") & (1 << 10) else size
    mask = 0xFFFFFFFF if r.addrsize == 4 else 0xFFFF
    count = (m.reg("ecx") & mask) if r.rep else 1
    base = v.segment_base(m, mem.seg)
    pointer = m.reg(index)
    while count:
        at = (base + (pointer & mask)) & 0xFFFFFFFF
        if inbound:
            space.write(at, m.port_read(port, size).to_bytes(size, "little"))
        else:
            m.port_write(port, size, int.from_bytes(space.read(at, size), "little"))
        pointer = (pointer & ~mask) | ((pointer + step) & mask)
        m.set_reg(index, pointer)
        count -= 1
        if r.rep:
            m.set_reg("ecx", (m.reg("ecx") & ~mask) | count)
    return r.next


def ins(m: Machine, v: VCpu, r: Recipe) -> int:
    return _string_io(m, v, r, True)


def outs(m: Machine, v: VCpu, r: Recipe) -> int:
    return _string_io(m, v, r, False)


def xsetbv(m: Machine, v: VCpu, r: Recipe) -> int:
    """With the SDM's checks at the virtual CPL and CR4 (popek.machine.xsave), then into the real XCR0: the
    state the guest's xsave, xrstor and xgetbv use is the one it enabled."""
    value = m.reg("edx") << 32 | m.reg("eax")
    found = xsave.fault(v.cpl, v.cr4, m.reg("ecx"), value)
    if found is not None:
        vector, why = found
        raise GuestFault(vector, 0 if vector == GP else None, why)
    m.engine.set_xcr0(value)
    return r.next
