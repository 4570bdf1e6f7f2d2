"""Exception and interrupt delivery through the guest's IDT, as SDM Vol. 3A §6.12 describes (Unicorn never
reads the IDT: it reports a vector and stops there).

For one event: read IDTR and the gate (interrupt and trap gates, 16- or 32-bit; task gates are not modelled
and count as a bad gate), check it (for ``int n``/``int3``/``into``: gate DPL >= CPL, else #GP(vector*8+2);
present, else #NP), check the target code segment, and either stay on the current stack (conforming code or
DPL = CPL) or switch to the ring-n stack from the TSS (DPL < CPL), pushing SS and ESP of the interrupted code
first. Then EFLAGS, CS, EIP and, for #DF #TS #NP #SS #GP #PF #AC, the error code. An interrupt gate clears IF;
both clear TF, NT, RF and VM. Error codes carry the EXT bit for events not caused by the program.

A fault while delivering follows SDM Table 6-5: contributory-then-contributory and page-fault-then-
contributory-or-page-fault become #DF; other pairs are handled serially (the second one is delivered). A
fault while delivering #DF is a triple fault, which ends the run. With no IDT loaded (limit 0) every event
faults, so the first exception becomes a triple fault.

Two rules of the machine, not of the SDM, keep every run finite and are documented where they apply:
a fault on the very first instruction of a handler the machine just entered (before any handler instruction
completed) is treated as a fault while delivering the event that entered it; and more than ``MAX_DEPTH``
such nested faults in a row are a triple fault. A real CPU would keep pushing frames until its stack ran out.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from popek.machine.descriptors import ACCESSED, IDT_GATES, INTERRUPT_GATES, Descriptor
from popek.machine.faults import (DF, ERROR_CODE, EXCEPTION, EXTERNAL, GP, NP, PF, SOFTWARE, SS, TS, GuestFault,
                                  Interrupt, double_fault)

if TYPE_CHECKING:
    from popek.machine.machine import Machine

TF, IF, NT, RF, VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17
MAX_DEPTH = 4


@dataclass(slots=True)
class Entry:
    """Where the last delivery left the CPU, to recognise a handler that faults before it starts."""

    eip: int
    total: int          # guest instructions counted when the handler was entered
    event: Interrupt
    depth: int


def escalate(first: Interrupt, second: Interrupt) -> Interrupt | None:
    """The event to deliver when ``second`` happened while delivering ``first``; None means triple fault."""
    if first.source == EXCEPTION and first.vector == DF:
        return None
    if first.source == EXCEPTION and double_fault(first.vector, second.vector):
        return Interrupt(DF, EXCEPTION, 0, eip=second.insn, insn=second.insn,
                         why=f"{second.name} while delivering {first.name}")
    return second


class Cpu:
    """What an event is delivered to: the bare machine's CPU (here) or a monitor's virtual CPU
    (``popek.monitors.vcpu.VCpu``). Each says how to enter a handler for an event (through its IDT, at its
    CPL: ``enter_handler``) and where a page fault's address goes (``fault_address``); ``deliver`` below is
    the one loop around them, with the SDM's double-fault rules and the machine's handler-fault rule."""

    __slots__ = ()
    entry: Entry | None             # the last delivery, for the handler-fault rule (None: none pending)

    def enter_handler(self, m: Machine, event: Interrupt, depth: int) -> None:
        """Push the frame and load the handler; raise GuestFault as the SDM's checks do."""
        raise NotImplementedError

    def fault_address(self, m: Machine, address: int) -> None:
        """Set the CR2 this CPU's guest sees."""
        raise NotImplementedError


def deliver(m: Machine, cpu: Cpu, event: Interrupt) -> None:
    """Deliver ``event`` to ``cpu`` or end the run with a triple fault; count what the guest's IDT receives.

    A fault on the first instruction of a handler just entered (no handler instruction completed; the
    faulting one is counted) counts as a fault while delivering that handler's event (module docstring)."""
    entry, cpu.entry = cpu.entry, None
    outer, depth = None, 0
    if (entry is not None and event.source == EXCEPTION and event.insn == entry.eip
            and m.total_instructions() <= entry.total + 1):
        outer, depth = entry.event, entry.depth + 1
    m.events.count(KIND[event.source], event.name)
    if event.address is not None:
        cpu.fault_address(m, event.address)
    current = escalate(outer, event) if outer is not None else event
    why = f"{event.name} ({event.why}) while entering {outer.name}" if outer is not None else ""
    while current is not None and depth <= MAX_DEPTH:
        try:
            cpu.enter_handler(m, current, depth)
            return
        except GuestFault as fault:
            if fault.vector == PF and fault.address is not None:
                cpu.fault_address(m, fault.address)
            second = fault.event(current.insn)
            m.events.count("delivery-fault", second.name)
            why = f"{second.name} ({fault.why}) while delivering {current.name}"
            then = escalate(current, second)
            if m.ops is not None:
                m.ops.delivery_fault(m, current, second, then)
            current, depth = then, depth + 1
    m.triple_fault(why if current is None else f"more than {MAX_DEPTH} nested faults: {why}")


# The event kinds the guest's IDT receives, by source (the machine's event vocabulary).
KIND = {EXCEPTION: "exception", SOFTWARE: "software-interrupt", EXTERNAL: "external-interrupt"}


def checked_gate(space, idtr: tuple[int, int], event: Interrupt, cpl: int) -> tuple[Descriptor, Descriptor, int]:
    """The IDT gate for ``event`` and its code segment, checked as the SDM's delivery checks them at ``cpl``
    (shared by the machine and by a monitor delivering through a guest's virtual IDT). Returns
    (gate, code segment, EXT bit); raises GuestFault with the SDM's error code."""
    ext = 0 if event.source == SOFTWARE else 1
    vector_code = event.vector * 8 + 2 + ext
    idt_base, idt_limit = idtr
    if event.vector * 8 + 7 > idt_limit:
        raise GuestFault(GP, vector_code, f"vector {event.vector:#x} beyond the IDT limit {idt_limit:#x}")
    gate = Descriptor.from_bytes(space.read(idt_base + event.vector * 8, 8))
    if not gate.system or gate.type not in IDT_GATES:
        raise GuestFault(GP, vector_code, f"IDT entry {event.vector:#x} is not an interrupt or trap gate")
    if event.source == SOFTWARE and gate.dpl < cpl:
        raise GuestFault(GP, event.vector * 8 + 2, f"{event.name} at CPL {cpl} through a DPL {gate.dpl} gate")
    if not gate.present:
        raise GuestFault(NP, vector_code, f"IDT entry {event.vector:#x} not present")
    selector = gate.selector
    if selector & 0xFFFC == 0:
        raise GuestFault(GP, ext, "null code selector in the gate")
    code_error = (selector & 0xFFFC) + ext
    code = space.descriptor(selector, GP, code_error)
    if not code.is_code or code.dpl > cpl:
        raise GuestFault(GP, code_error, f"gate selector {selector:#x} is not code at DPL <= {cpl}")
    if not code.present:
        raise GuestFault(NP, code_error, f"code segment {selector:#x} not present")

    return gate, code, ext


def push_frame(space, gate: Descriptor, code: Descriptor, ext: int, cpl: int, words: list[int],
               stack_base: int, pushed_ss: int, esp: int, tss_stack) -> tuple[int, int | None, int, Descriptor | None]:
    """Push the frame ``words`` (EFLAGS, CS, EIP[, error code]) for a delivery through ``gate`` into ``code``,
    checked as the SDM does: on the inner stack ``tss_stack(space, new_cpl, ext)`` when the privilege
    changes (``pushed_ss``:``esp`` pushed first), else on the current stack, at ``esp`` in the loaded SS
    (base ``stack_base``: what SS loaded, not what its descriptor may read now).
    Returns (new CPL, new SS or None, new ESP, the new stack segment's descriptor or None)."""
    if not code.conforming and code.dpl < cpl:
        new_cpl = code.dpl
        new_ss, new_esp = tss_stack(space, new_cpl, ext)
        ss_error = (new_ss & 0xFFFC) + ext
        if new_ss & 0xFFFC == 0:
            raise GuestFault(TS, ext, f"null ring-{new_cpl} stack selector in the TSS")
        stack = space.descriptor(new_ss, TS, ss_error)
        if new_ss & 3 != new_cpl or stack.dpl != new_cpl or not stack.writable_data:
            raise GuestFault(TS, ss_error, f"TSS ring-{new_cpl} stack {new_ss:#x} unusable")
        if not stack.present:
            raise GuestFault(SS, ss_error, f"TSS ring-{new_cpl} stack {new_ss:#x} not present")
        words = [pushed_ss, esp] + words
        stack_base = stack.base
    else:
        new_cpl, new_ss, new_esp, stack = cpl, None, esp, None
    width = 4 if gate.gate_bits == 32 else 2
    new_esp = (new_esp - width * len(words)) & 0xFFFFFFFF
    mask = 0xFFFFFFFF if width == 4 else 0xFFFF
    frame = struct.pack(f"<{len(words)}{'I' if width == 4 else 'H'}", *(w & mask for w in reversed(words)))
    space.write((stack_base + new_esp) & 0xFFFFFFFF, frame, fault=(SS, ext))
    return new_cpl, new_ss, new_esp, stack


class RealCpu(Cpu):
    """The bare machine's CPU: its real IDT, CPL, TSS and CR2."""

    __slots__ = ("entry",)

    def __init__(self):
        self.entry = None

    def fault_address(self, m: Machine, address: int) -> None:
        m.set_cr2(address)

    def enter_handler(self, m: Machine, event: Interrupt, depth: int) -> None:
        regs = m.registers()
        cpl = regs["cs"] & 3
        space = m.address_space()
        gate, code, ext = checked_gate(space, m.idtr(), event, cpl)
        words = [regs["eflags"], regs["cs"], event.eip]
        if event.source == EXCEPTION and event.vector in ERROR_CODE and event.error_code is not None:
            words.append(event.error_code)
        new_cpl, new_ss, esp, stack = push_frame(space, gate, code, ext, cpl, words, m.engine.segment_base("ss"),
                                                 regs["ss"], regs["esp"], m.tss_stack)
        width = 4 if gate.gate_bits == 32 else 2

        eflags = regs["eflags"] & ~(TF | NT | RF | VM)
        if gate.type in INTERRUPT_GATES:
            eflags &= ~IF
        eip = gate.offset if width == 4 else gate.offset & 0xFFFF
        cs = (gate.selector & 0xFFFC) | new_cpl
        accessed = code.high & (ACCESSED if stack is None else stack.high) & ACCESSED
        m.enter(cs=cs, eip=eip, eflags=eflags, esp=esp, cpl=new_cpl,
                ss=None if new_ss is None else (new_ss & 0xFFFC) | new_cpl, space=None if accessed else space)
        self.entry = Entry(eip, m.total_instructions(), event, depth)
