"""Routines for control transfers through segments and gates: far jmp, far call (code segments and call
gates, with the stack switch through the guest's TSS), far ret, int n / int3 / into, iret, all at the
virtual CPL."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Callable

from popek.machine import fastcall
from popek.machine.descriptors import Descriptor
from popek.machine.faults import BP, GP, NP, OF, SOFTWARE, SS, TS, GuestFault, Interrupt, NotModelled
from popek.machine.memory import AddressSpace
from popek.monitors.emulation.access import address, peek, push
from popek.monitors.emulation.recipe import IMM, Recipe
from popek.monitors.emulation.sensitive import POPF_ALWAYS
from popek.monitors.emulation.system import msr_value
from popek.monitors.vcpu import IF, IOPL, NT, RF, VM, VCpu, deliver

if TYPE_CHECKING:
    from popek.machine.machine import Machine

VIF, VIP = 1 << 19, 1 << 20


# --- control transfers through segments: far jmp/call/ret, int, iret ----------------------------------------
CALL_GATES = frozenset({4, 12})


def _far_pointer(m: Machine, v: VCpu, r: Recipe, space: AddressSpace) -> tuple[int, int]:
    """(selector, offset) of a direct ptr16:16/32 or an indirect m16:16/32 operand."""
    ops = r.operands
    if ops[0].kind == IMM:
        return ops[0].number & 0xFFFF, ops[1].number
    at = address(m, v, r, ops[0], space)
    width = r.opsize
    raw = space.read(at, width + 2)
    return int.from_bytes(raw[width:], "little"), int.from_bytes(raw[:width], "little")


def _code_target(space: AddressSpace, selector: int, cpl: int) -> Descriptor:
    """A code segment a jmp/call may reach directly at ``cpl``: SDM JMP/CALL, "far ... to a code segment"."""
    desc = space.descriptor(selector, GP, selector & 0xFFFC)
    if not desc.is_code:
        raise GuestFault(GP, selector & 0xFFFC, f"{selector:#x} is not a code segment")
    if desc.conforming:
        if desc.dpl > cpl:
            raise GuestFault(GP, selector & 0xFFFC, f"conforming {selector:#x}: DPL {desc.dpl} > CPL {cpl}")
    elif selector & 3 > cpl or desc.dpl != cpl:
        raise GuestFault(GP, selector & 0xFFFC, f"{selector:#x}: RPL/DPL do not match CPL {cpl}")
    if not desc.present:
        raise GuestFault(NP, selector & 0xFFFC, f"code segment {selector:#x} not present")
    return desc


def _far_target(m: Machine, v: VCpu, r: Recipe, space: AddressSpace):
    """Resolve a far jmp/call: ("code", selector, offset) or ("gate", gate descriptor, target code)."""
    selector, offset = _far_pointer(m, v, r, space)
    if selector & 0xFFFC == 0 and not selector & 4:
        raise GuestFault(GP, 0, "far transfer to a null selector")
    desc = space.descriptor(selector, GP, selector & 0xFFFC)
    if not desc.system:
        _code_target(space, selector, v.cpl)
        return "code", selector, offset & (0xFFFFFFFF if r.opsize == 4 else 0xFFFF), None
    if desc.type not in CALL_GATES:
        raise GuestFault(GP, selector & 0xFFFC, f"far transfer to system descriptor type {desc.type} "
                                                "(task switches are not modelled)")
    if desc.dpl < max(v.cpl, selector & 3):
        raise GuestFault(GP, selector & 0xFFFC, f"call gate {selector:#x}: DPL {desc.dpl} too low")
    if not desc.present:
        raise GuestFault(NP, selector & 0xFFFC, f"call gate {selector:#x} not present")
    target = desc.selector
    if target & 0xFFFC == 0:
        raise GuestFault(GP, 0, "null selector in a call gate")
    code = space.descriptor(target, GP, target & 0xFFFC)
    if not code.is_code or code.dpl > v.cpl:
        raise GuestFault(GP, target & 0xFFFC, f"call gate target {target:#x} is not code at DPL <= CPL")
    if not code.present:
        raise GuestFault(NP, target & 0xFFFC, f"call gate target {target:#x} not present")
    offset = desc.offset if desc.type == 12 else desc.offset & 0xFFFF
    return "gate", target, offset, (desc, code)


def _enter(m: Machine, v: VCpu, cs: int, eip: int, cpl: int, esp: int | None = None, ss: int | None = None,
           eflags: int | None = None) -> int:
    """Load CS:EIP (and SS:ESP, EFLAGS) for guest privilege ``cpl``; the virtual CPL follows."""
    real = v.real_cpl(cpl)
    kept = m.unaccessed_descriptors(v.space(m), (cs, ss)) if not v.ring else ()
    m.enter(cs=(cs & 0xFFFC) | real, eip=eip, eflags=m.reg("eflags") if eflags is None else eflags,
            esp=m.reg("esp") if esp is None else esp, cpl=real,
            ss=None if ss is None else (ss & 0xFFFC) | real)
    m.restore_descriptors(kept)
    v.cpl = cpl
    return eip


def jmp_far(m: Machine, v: VCpu, r: Recipe) -> int:
    space = v.space(m)
    _kind, selector, offset, gate = _far_target(m, v, r, space)
    if gate is not None:
        code = gate[1]
        if (not code.conforming and code.dpl != v.cpl) or code.dpl > v.cpl:
            raise GuestFault(GP, selector & 0xFFFC, "jmp through a call gate cannot change privilege")
    return _enter(m, v, selector, offset, v.cpl)


def call_far(m: Machine, v: VCpu, r: Recipe) -> int:
    space = v.space(m)
    _kind, selector, offset, gate = _far_target(m, v, r, space)
    cs = (m.reg("cs") & 0xFFFC) | v.cpl
    if gate is None or gate[1].conforming or gate[1].dpl == v.cpl:
        width = r.opsize if gate is None else (4 if gate[0].type == 12 else 2)
        push(m, v, space, [cs, r.next], width)
        return _enter(m, v, selector, offset, v.cpl)
    # Through a call gate to more privileged code: the new stack from the TSS, then the old SS:ESP, the
    # gate's parameter count of words from the old stack, and the return address (SDM CALL).
    desc, code = gate
    width = 4 if desc.type == 12 else 2
    new_cpl = code.dpl
    new_ss, new_esp = v.tss_stack(space, new_cpl, 0)
    if new_ss & 0xFFFC == 0:
        raise GuestFault(TS, 0, f"null ring-{new_cpl} stack selector in the TSS")
    stack = space.descriptor(new_ss, TS, new_ss & 0xFFFC)
    if new_ss & 3 != new_cpl or stack.dpl != new_cpl or not stack.writable_data:
        raise GuestFault(TS, new_ss & 0xFFFC, f"TSS ring-{new_cpl} stack {new_ss:#x} unusable")
    if not stack.present:
        raise GuestFault(SS, new_ss & 0xFFFC, f"TSS ring-{new_cpl} stack {new_ss:#x} not present")
    count = desc.high & 0x1F
    params = peek(m, v, space, count, width) if count else []
    old_ss, old_esp = (m.reg("ss") & 0xFFFC) | v.cpl, m.reg("esp")
    words = [old_ss, old_esp] + list(reversed(params)) + [cs, r.next]
    new_esp = (new_esp - width * len(words)) & 0xFFFFFFFF
    mask = (1 << (8 * width)) - 1
    data = struct.pack(f"<{len(words)}{'I' if width == 4 else 'H'}", *(w & mask for w in reversed(words)))
    space.write((stack.base + new_esp) & 0xFFFFFFFF, data, fault=(SS, new_ss & 0xFFFC))
    return _enter(m, v, selector, offset, new_cpl, esp=new_esp, ss=new_ss)


def _return_target(space: AddressSpace, selector: int, cpl: int) -> Descriptor:
    """The code segment a retf/iret returns to (SDM RET, IRET: "return to ... privilege level")."""
    error = selector & 0xFFFC
    if error == 0 and not selector & 4:
        raise GuestFault(GP, 0, "return to a null selector")
    rpl = selector & 3
    if rpl < cpl:
        raise GuestFault(GP, error, f"return to RPL {rpl} from CPL {cpl}")
    desc = space.descriptor(selector, GP, error)
    if not desc.is_code or (desc.conforming and desc.dpl > rpl) or (not desc.conforming and desc.dpl != rpl):
        raise GuestFault(GP, error, f"return selector {selector:#x} does not fit RPL {rpl}")
    if not desc.present:
        raise GuestFault(NP, error, f"code segment {selector:#x} not present")
    return desc


def _outer_stack(space: AddressSpace, ss: int, rpl: int) -> None:
    error = ss & 0xFFFC
    if error == 0 and not ss & 4:
        raise GuestFault(GP, 0, "return to a null stack selector")
    desc = space.descriptor(ss, GP, error)
    if ss & 3 != rpl or desc.dpl != rpl or not desc.writable_data:
        raise GuestFault(GP, error, f"return stack {ss:#x} does not fit RPL {rpl}")
    if not desc.present:
        raise GuestFault(SS, error, f"stack segment {ss:#x} not present")


CONFORMING_CODE = 0x3 << 10                 # type bits 11 (code) and 10 (conforming) of a descriptor's high dword


def _null_data_segments(m: Machine, v: VCpu, space: AddressSpace, cpl: int) -> None:
    """After a return to an outer ring: data (and non-conforming code) segments it may not use are nulled.
    The CPU checks the DPL the segment loaded (SDM, IRET: "DPL in hidden part of segment register"). Under
    compressed rings the loaded DPL is the real one; where that cannot tell (a real DPL at or below the
    monitor's ring and a target ring there too) the guest's table says."""
    for sreg in ("es", "fs", "gs", "ds"):
        loaded = m.engine.segment(sreg)
        if loaded.selector & 0xFFFC == 0:
            continue
        if loaded.dpl > v.ring or cpl > v.ring:
            keep = loaded.flags & CONFORMING_CODE == CONFORMING_CODE or loaded.dpl >= cpl
        else:
            try:
                desc = space.descriptor(loaded.selector, GP, 0)
            except GuestFault:
                m.set_reg(sreg, 0)              # (no longer a valid selector)
                continue
            keep = (desc.is_code and desc.conforming) or desc.dpl >= cpl
        if not keep:
            m.set_reg(sreg, 0)


def ret_far(m: Machine, v: VCpu, r: Recipe) -> int:
    space = v.space(m)
    width = r.opsize
    release = r.operands[0].number & 0xFFFF if r.operands else 0
    eip, cs = peek(m, v, space, 2, width)
    cs &= 0xFFFF
    _return_target(space, cs, v.cpl)
    rpl = cs & 3
    esp = (m.reg("esp") + 2 * width + release) & 0xFFFFFFFF
    if rpl == v.cpl:
        return _enter(m, v, cs, eip, rpl, esp=esp)
    new_esp, new_ss = peek(m, v, space, 2, width, skip=2 * width + release)
    new_ss &= 0xFFFF
    _outer_stack(space, new_ss, rpl)
    _enter(m, v, cs, eip, rpl, esp=(new_esp + release) & 0xFFFFFFFF, ss=new_ss)
    _null_data_segments(m, v, space, rpl)
    return eip


# IRET (SDM Vol. 2A): what the popped EFLAGS may change, by the privilege of the code executing the iret.
_IRET_ALWAYS = POPF_ALWAYS | RF


def iret(m: Machine, v: VCpu, r: Recipe) -> int:
    space = v.space(m)
    width = r.opsize
    real_flags = m.reg("eflags")
    if real_flags & NT:
        # A task return through the TSS back link: #TS when the link is not a busy TSS, as the bare
        # machine does; a real task switch is not modelled.
        link = struct.unpack("<H", space.read(v.tr.base, 2))[0] if v.tr.limit >= 1 else 0
        raise GuestFault(TS, link & 0xFFFC, f"iret with NT: back link {link:#x} (task switches are not modelled)")
    eip, cs, flags = peek(m, v, space, 3, width)
    cs &= 0xFFFF
    if width == 4 and flags & VM and v.cpl == 0:
        raise NotModelled("iret to virtual-8086 mode")
    _return_target(space, cs, v.cpl)
    rpl = cs & 3
    changeable = _IRET_ALWAYS | (IF if v.cpl <= v.iopl else 0) | (IOPL | VIF | VIP if v.cpl == 0 else 0)
    if width == 2:
        changeable &= 0xFFFF
    old = v.eflags(real_flags)
    new = (old & ~changeable) | (flags & changeable) | 2
    if rpl == v.cpl:
        return _enter(m, v, cs, eip, rpl, esp=(m.reg("esp") + 3 * width) & 0xFFFFFFFF,
                      eflags=v.set_eflags(new))
    new_esp, new_ss = peek(m, v, space, 2, width, skip=3 * width)
    new_ss &= 0xFFFF
    _outer_stack(space, new_ss, rpl)
    _enter(m, v, cs, eip, rpl, esp=new_esp, ss=new_ss, eflags=v.set_eflags(new))
    _null_data_segments(m, v, space, rpl)
    return eip


def int_(m: Machine, v: VCpu, r: Recipe) -> int:
    """int n, int3, into: delivery through the virtual IDT with the software-interrupt checks."""
    if r.name == "into":
        if not m.reg("eflags") & (1 << 11):
            return r.next
        vector = OF
    else:
        vector = BP if r.name == "int3" else r.operands[0].number & 0xFF
    deliver(m, v, Interrupt(vector, SOFTWARE, None, eip=r.next, insn=r.address, why=r.text))
    return m.reg("eip")


def _msr(m: Machine, v: VCpu) -> Callable[[int], int]:
    return lambda number: msr_value(m, v, number)


def _enter_flat(m: Machine, v: VCpu, name: str, cs: int, ss: int, cpl: int, eip: int, esp: int,
                eflags: int) -> int:
    """The flat CS and SS sysenter/sysexit load at guest privilege ``cpl``, at its real ring, without reading a
    table (as the CPU does). Where the monitor compresses rings, its virtual CPL after a transfer it does not
    see comes from the guest's descriptor of CS (Deprivileged.sync_cpl), so the GDT must hold the flat
    descriptors there (the SDM asks an operating system for them); the run says so where it does not."""
    real = v.real_cpl(cpl)
    if 0 < real <= v.ring:                      # (a compressed ring: sync_cpl would read the table)
        unlike = fastcall.unlike_flat(lambda selector: v.space(m).descriptor(selector, GP, 0), cs, ss, cpl)
        if unlike is not None:
            raise NotModelled(f"{name} under compressed rings where {unlike}")
    m.enter_flat((cs & 0xFFFC) | real, (ss & 0xFFFC) | real, real, eip=eip, esp=esp, eflags=eflags)
    v.cpl = cpl
    return eip


def sysenter(m: Machine, v: VCpu, r: Recipe) -> int:
    """To the guest's CPL 0 through its (virtual) SYSENTER MSRs (popek.machine.fastcall)."""
    cs, ss, eip, esp = fastcall.sysenter(_msr(m, v))
    eflags = v.set_eflags(v.eflags(m.reg("eflags")) & ~fastcall.SYSENTER_CLEARS)
    return _enter_flat(m, v, "sysenter", cs, ss, 0, eip, esp, eflags)


def sysexit(m: Machine, v: VCpu, r: Recipe) -> int:
    """From the guest's CPL 0 to CPL 3 at EDX with ESP = ECX (32-bit form; popek.machine.fastcall)."""
    cs, ss, eip, esp = fastcall.sysexit(_msr(m, v), v.cpl, m.reg("edx"), m.reg("ecx"))
    return _enter_flat(m, v, "sysexit", cs, ss, 3, eip, esp, m.reg("eflags"))
