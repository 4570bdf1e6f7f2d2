"""The guest's own state as the monitor sees it at a VM exit (the VMCS/VMCB guest-state area).

Under ``hvm`` the guest owns the real GDTR, IDTR, LDTR, TR, CR0, CR2, CR4, debug registers, MSRs, IF and IOPL
(and CR3 with nested paging). At each exit ``GuestState.load`` reads them from the real CPU into a
ring-0 ``VCpu``, the shared emulation routines run against it, and whatever a routine changed is written
back before the guest resumes (``on_change`` for tables and control registers, ``store`` for debug
registers and MSRs): that is VM exit and VM entry. Without nested paging the guest's CR3 stays here and the
real CR3 points at the monitor's shadow page directory (``paging``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import UcError

from popek.monitors.shadow import ShadowPaging
from popek.monitors.shadow.tables import PRESENT
from popek.monitors.vcpu import DR_RESET, IOPL_SHIFT, Table, VCpu

if TYPE_CHECKING:
    from popek.machine.machine import Machine

_DRS = (X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3, X.UC_X86_REG_DR6,
        X.UC_X86_REG_DR7)
_CONTROL = (X.UC_X86_REG_CR0, X.UC_X86_REG_CR2, X.UC_X86_REG_CR3, X.UC_X86_REG_CR4, X.UC_X86_REG_EFLAGS,
            X.UC_X86_REG_CS)
CR4_PAE = 1 << 5
LDT_TYPE, TSS_TYPE = 0x2 << 8, 0x9 << 8          # the descriptor caches lldt and ltr leave (see Machine.set_table)


class GuestPaging(ShadowPaging):
    """Shadow paging for a guest at its own ring 0: the real CR0 and CR4 are the guest's (it reads them without
    an exit, through the read shadows), only CR3 is the monitor's."""

    def paging_changed(self) -> bool:
        changed = super().paging_changed()
        self.m.set_reg("cr4", self.v.cr4 & ~CR4_PAE)  # 32-bit shadow paging only (as ShadowPaging)
        self.m.set_reg("cr0", self.v.cr0)
        return changed


class GuestState:
    """The guest's state between an exit and the next entry (module docstring)."""

    def __init__(self, machine: Machine, shadow_paging: bool, count_shadow):
        self.m = machine
        self.v = VCpu.from_machine(machine, 0)
        self.v.on_change = self._changed
        self.paging = GuestPaging(machine, self.v) if shadow_paging else None
        self._count_shadow = count_shadow
        self._dr: list[int] = list(DR_RESET)

    def load(self) -> VCpu:
        """VM exit: the real CPU's guest-owned state into the vcpu."""
        m, v = self.m, self.v
        cr0, cr2, cr3, cr4, eflags, cs = m.engine.read_many(_CONTROL)
        v.cpl, v.iflag, v.iopl = cs & 3, (eflags >> 9) & 1, (eflags >> IOPL_SHIFT) & 3
        v.cr0, v.cr2, v.cr4 = cr0, cr2, cr4
        if self.paging is None:
            v.cr3 = cr3
        _, base, limit = m.table("gdtr")
        v.gdtr = (base, limit & 0xFFFF)
        _, base, limit = m.table("idtr")
        v.idtr = (base, limit & 0xFFFF)
        v.ldtr, v.tr = Table(*m.table("ldtr")), Table(*m.table("tr"))
        dr = m.engine.read_many(_DRS)
        v.dr = [dr[0], dr[1], dr[2], dr[3], dr[4], dr[5], dr[4], dr[5]]
        self._dr = list(v.dr)
        return v

    def store(self) -> None:
        """VM entry: what a routine changed without telling ``on_change`` (debug registers, MSRs)."""
        m, v = self.m, self.v
        if v.dr != self._dr:
            for n, reg in zip((0, 1, 2, 3, 6, 7), _DRS):
                m.engine.write(reg, v.dr[n])
        for number, value in v.msr.items():
            try:
                m.uc.msr_write(number, value)
            except UcError:
                pass                # an MSR the CPU model does not have: the bare machine ignores it too
        v.msr.clear()

    def _changed(self, what: str) -> None:
        m, v = self.m, self.v
        if what in ("gdtr", "idtr"):
            m.set_table(what, *getattr(v, what))
        elif what in ("ldtr", "tr"):
            t = getattr(v, what)
            kind = LDT_TYPE if what == "ldtr" else TSS_TYPE
            m.set_table(what, t.base, t.limit, t.selector, PRESENT | kind if t.selector & 0xFFFC else 0)
        elif what == "cr2":
            m.set_cr2(v.cr2)
        elif what in ("cr0", "cr3", "cr4", "tlb"):
            if self.paging is not None:
                self._count_shadow("paging")
                self.paging.paging_changed()
            elif what != "tlb":
                m.set_reg(what, getattr(v, what))
