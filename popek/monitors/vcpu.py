"""The virtual CPU of a deprivileged guest, and event delivery through the guest's own (virtual) IDT.

A monitor that runs the guest kernel at a real ring other than 0 keeps here what the guest believes about
its privileged state; the emulation routines (``popek.monitors.emulation``) read and write it, and the
run result reports it (DESIGN §3.4: "for a monitor, the virtual values").

Fields of ``VCpu``:
- ``ring``: the real ring the guest's ring 0 runs at (3 or 1 for ``trap``; 0 means no deprivileging, real
  and virtual privilege coincide: the differential tests emulate against such a vcpu on the bare machine).
  A guest ring ``v`` runs at real ring ``max(v, ring)`` (``real_cpl``): ring compression.
- ``cpl``, ``iflag`` (EFLAGS.IF as 0/1), ``iopl``: the virtual privilege level and system flags. The
  real EFLAGS keep IF = 1 and IOPL = 0 while ``ring > 0`` (the monitor takes interrupts and traps cli,
  sti and port I/O); ``eflags(real)`` merges the virtual bits into a real EFLAGS value.
- ``gdtr``, ``idtr``: ``(base, limit)`` as the guest loaded them (linear addresses in the guest's space).
- ``ldtr``, ``tr``: ``Table(selector, base, limit)``, the visible selector and the descriptor cache.
  The guest's ring-n stacks (``tss_stack``) are read from guest memory through the virtual TR.
- ``cr0``, ``cr2``, ``cr3``, ``cr4``; ``dr`` (DR0-DR7); ``msr`` (values the guest wrote; others read
  through to Unicorn's MSRs, which is what the bare machine would return).
- ``on_change(what)``: the monitor's callback when a routine changed something the real machine may have
  to follow: "gdtr", "idtr", "ldtr", "tr", "cr0", "cr2", "cr3", "cr4", "tlb" (invlpg), and "descriptors"
  (a traced guest descriptor-table store). None: nothing follows.
- ``entry``: the last delivery through the virtual IDT, for the machine's handler-fault rule.

Selectors: the guest's selectors keep their meaning; only the RPL of the real CS and SS differs
(``real_cpl(cpl)`` instead of ``cpl``), so the visible CS/SS are ``(real & ~3) | cpl``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple

from unicorn import x86_const as X

from popek.events import REFLECT
from popek.machine import interrupts, ioperm
from popek.machine.descriptors import INTERRUPT_GATES, Descriptor, tss_stack_offsets
from popek.machine.faults import ERROR_CODE, EXCEPTION, TS, GuestFault, Interrupt
from popek.machine.memory import AddressSpace

if TYPE_CHECKING:
    from popek.machine.machine import Machine

IF, IOPL_SHIFT = 1 << 9, 12
IOPL = 3 << IOPL_SHIFT
TF, NT, RF, VM = 1 << 8, 1 << 14, 1 << 16, 1 << 17
# DR6 and DR7 after reset, as Unicorn reads them (measured): the reserved bits that read as ones.
DR_RESET = (0, 0, 0, 0, 0xFFFF0FF0, 0x400, 0xFFFF0FF0, 0x400)
_DRS = (X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3, X.UC_X86_REG_DR6,
        X.UC_X86_REG_DR7)


class Table(NamedTuple):
    selector: int
    base: int
    limit: int


@dataclass(slots=True)
class VCpu(interrupts.Cpu):
    ring: int = 3
    cpl: int = 0
    iflag: int = 0
    iopl: int = 0
    gdtr: tuple[int, int] = (0, 0)
    idtr: tuple[int, int] = (0, 0)
    ldtr: Table = Table(0, 0, 0)
    tr: Table = Table(0, 0, 0)
    cr0: int = 0x11
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    dr: list[int] = field(default_factory=lambda: list(DR_RESET))
    msr: dict[int, int] = field(default_factory=dict)
    on_change: Callable[[str], None] | None = None
    entry: interrupts.Entry | None = None

    @classmethod
    def from_machine(cls, machine: Machine, ring: int) -> VCpu:
        """The machine's current real state as the guest's virtual state (before deprivileging it)."""
        s = machine.state()
        dr = machine.engine.read_many(_DRS)
        return cls(ring=ring, cpl=s["cpl"], iflag=(s["eflags"] >> 9) & 1, iopl=(s["eflags"] >> IOPL_SHIFT) & 3,
                   dr=[dr[0], dr[1], dr[2], dr[3], dr[4], dr[5], dr[4], dr[5]],     # DR4/DR5 alias DR6/DR7
                   gdtr=(s["gdtr"]["base"], s["gdtr"]["limit"]), idtr=(s["idtr"]["base"], s["idtr"]["limit"]),
                   ldtr=Table(*machine.table("ldtr")), tr=Table(*machine.table("tr")),
                   cr0=s["cr0"], cr2=s["cr2"], cr3=s["cr3"], cr4=s["cr4"])

    def changed(self, what: str) -> None:
        if self.on_change is not None:
            self.on_change(what)

    # --- privilege ----------------------------------------------------------------------------------
    def real_cpl(self, cpl: int) -> int:
        return cpl if cpl > self.ring else self.ring

    def real_selector(self, selector: int, rpl: int) -> int:
        """The real CS or SS for a guest selector loaded at guest privilege ``rpl``."""
        return (selector & 0xFFFC) | self.real_cpl(rpl)

    def eflags(self, real: int) -> int:
        """The EFLAGS the guest would see: the real one with the virtual IF and IOPL."""
        if not self.ring:
            return real
        return (real & ~(IF | IOPL)) | (self.iflag << 9) | (self.iopl << IOPL_SHIFT)

    def set_eflags(self, virtual: int) -> int:
        """Take IF and IOPL from a virtual EFLAGS value; return the real EFLAGS to load."""
        self.iflag, self.iopl = (virtual >> 9) & 1, (virtual >> IOPL_SHIFT) & 3
        return virtual if not self.ring else (virtual & ~IOPL) | IF

    # --- the guest's view of memory and tables ------------------------------------------------------
    def space(self, machine: Machine, mark: bool = True) -> AddressSpace:
        """Linear addresses through the guest's own paging and descriptor tables (``mark``: see AddressSpace)."""
        return AddressSpace(machine.memory, self.cr0, self.cr3, self.cr4, self.gdtr, self.ldtr[1:], mark)

    def segment_base(self, machine: Machine, name: str) -> int:
        """Base of the segment register ``name`` holds: the real register's, loaded from the shadow tables,
        which copy the guest's bases (as the CPU does, it keeps what it loaded when a descriptor changes)."""
        return machine.engine.segment_base(name)

    def tss_stack(self, space: AddressSpace, cpl: int, ext: int) -> tuple[int, int]:
        """(SS, ESP) for ring ``cpl`` from the guest's TSS (virtual TR)."""
        selector, base, limit = self.tr
        esp_at, ss_at = tss_stack_offsets(cpl)
        if selector & 0xFFFC == 0 or limit < ss_at + 1:
            raise GuestFault(TS, (selector & 0xFFFC) + ext, f"no ring-{cpl} stack in TSS {selector:#x}")
        esp, ss = struct.unpack("<IH", space.read(base + esp_at, 6))
        return ss, esp

    def state(self, machine: Machine) -> dict:
        """The state of DESIGN §3.4 with the virtual CPL, flags, CS/SS RPL, tables and control registers."""
        s = machine.state()
        s["eflags"] = self.eflags(s["eflags"])
        s["cs"] = (s["cs"] & 0xFFFC) | self.cpl
        s["ss"] = (s["ss"] & 0xFFFC) | self.cpl
        s["cpl"] = self.cpl
        s["gdtr"] = {"base": self.gdtr[0], "limit": self.gdtr[1] & 0xFFFF}
        s["idtr"] = {"base": self.idtr[0], "limit": self.idtr[1] & 0xFFFF}
        s["ldtr"], s["tr"] = self.ldtr.selector & 0xFFFF, self.tr.selector & 0xFFFF
        s.update(cr0=self.cr0, cr2=self.cr2, cr3=self.cr3, cr4=self.cr4)
        return s

    def io_permitted(self, machine: Machine, port: int, size: int) -> bool:
        """The I/O-permission check at the virtual CPL and IOPL, then the guest's own TSS bitmap (virtual TR)."""
        return self.cpl <= self.iopl or ioperm.bitmap_allows(self.space(machine), tuple(self.tr), port, size)

    # --- delivery through the virtual IDT (SDM Vol. 3A §6.12, at the virtual CPL) -----------------------
    # ``popek.machine.interrupts.deliver(machine, vcpu, event)`` delivers to the guest through its virtual
    # IDT with the same rules as the bare machine's delivery (double faults, triple fault, the handler-fault
    # rule), but every privilege check uses the virtual CPL, the gate and code descriptors come from the
    # guest's tables, a stack switch takes the guest's ring-n stack from its TSS, and the frame holds what
    # the guest would see (virtual EFLAGS, CS and SS with the virtual RPL).
    def fault_address(self, machine: Machine, address: int) -> None:
        self.cr2 = address

    def gate(self, space: AddressSpace, event: Interrupt) -> tuple[Descriptor, Descriptor, int]:
        """The gate an event goes through and its code segment, checked (a monitor whose guest registers its
        handlers otherwise, such as a PV trap table, overrides this)."""
        return interrupts.checked_gate(space, self.idtr, event, self.cpl)

    def enter_handler(self, m: Machine, event: Interrupt, depth: int) -> None:
        regs = m.registers()
        cpl = self.cpl
        space = self.space(m)
        gate, code, ext = self.gate(space, event)
        eflags = self.eflags(regs["eflags"])
        words = [eflags, (regs["cs"] & 0xFFFC) | cpl, event.eip]
        if event.source == EXCEPTION and event.vector in ERROR_CODE and event.error_code is not None:
            words.append(event.error_code)
        new_cpl, new_ss, esp, _stack = interrupts.push_frame(space, gate, code, ext, cpl, words,
                                                            self.segment_base(m, "ss"), (regs["ss"] & 0xFFFC) | cpl,
                                                            regs["esp"], self.tss_stack)
        width = 4 if gate.gate_bits == 32 else 2

        eflags &= ~(TF | NT | RF | VM)
        if gate.type in INTERRUPT_GATES:
            eflags &= ~IF
        real_eflags = self.set_eflags(eflags)
        eip = gate.offset if width == 4 else gate.offset & 0xFFFF
        real_cpl = self.real_cpl(new_cpl)
        m.enter(cs=(gate.selector & 0xFFFC) | real_cpl, eip=eip, eflags=real_eflags, esp=esp, cpl=real_cpl,
                ss=None if new_ss is None else (new_ss & 0xFFFC) | real_cpl)
        self.cpl = new_cpl
        self.entry = interrupts.Entry(eip, m.total_instructions(), event, depth)


def deliver(machine: Machine, vcpu: VCpu, event: Interrupt) -> None:
    """Deliver ``event`` to the guest through its virtual IDT (``VCpu.enter_handler``), or end the run with a
    triple fault."""
    machine.events.count(REFLECT, event.name)          # the monitor's software delivery (popek.events)
    interrupts.deliver(machine, vcpu, event)


