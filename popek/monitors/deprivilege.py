"""What every monitor that owns the real system state shares (``trap``, ``bt``, and ``pv`` after them).

Such a monitor runs the guest on a virtual CPU (``popek.monitors.vcpu.VCpu``): the guest's GDTR, IDTR,
LDTR, TR, control registers and (below ring 0) IF and IOPL are virtual, and the real ones belong to the
monitor, which points them at shadow tables in monitor memory (``popek.monitors.shadow``). ``Deprivileged``
is that set-up and its upkeep, written once:

- ``attach``: the virtual CPU from the machine's boot state, the shadow tables, the guest entered at its
  real ring (``ring``: 3 or 1 for ``trap``, 1 for ``pv``, 0 for ``bt``, which deprivileges nothing but the
  tables) with every segment register reloaded from the shadow GDT;
- ``changed``: what the shadow structures redo when the virtual CPU changes (``FOLLOW``, a table), and the
  monitor's own follow-up (``followed``);
- the virtual CPL of code the monitor did not see enter (``sync_cpl``), the virtual I/O-permission check
  (``io_allowed``), the virtual IF (``interrupts_enabled``) and the visible state (``state``);
- ``intercept``: events from the machine, dispatched through ``routes``, a table keyed by
  ``(event source, vector)`` (a vector of None matches every vector of that source). A route returns True
  when it handled the event; everything else is reflected to the guest (``reflect``: through its virtual
  IDT, at the virtual CPL). ``trap`` routes #GP to the emulation routines and #PF to shadow paging;
  ``pv`` adds ``int 0x82`` for hypercalls.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from unicorn.x86_const import UC_X86_REG_CS as UC_CS
from unicorn.x86_const import UC_X86_REG_DR6 as UC_DR6

from popek.machine.descriptors import Descriptor
from popek.machine.faults import DB, EXCEPTION, GP, GuestFault, Interrupt
from popek.monitors.base import MonitorOps
from popek.monitors.shadow import Shadow
from popek.monitors.vcpu import VCpu, deliver

if TYPE_CHECKING:
    from popek.machine.machine import Machine

Route = Callable[["Machine", Interrupt], bool]
DATA_SEGMENTS = ("ds", "es", "fs", "gs")
# What the shadow structures redo when the vcpu changes (VCpu.on_change): the event name the work is
# counted under ("shadow" events) and the Shadow method that does it.
FOLLOW = {"gdtr": "gdt", "ldtr": "ldt", "tr": "tss", "cr0": "paging", "cr3": "paging", "cr4": "paging",
          "tlb": "paging"}
# Changes after which a code selector may mean another segment (sync_cpl forgets what it knew).
TABLE_CHANGES = frozenset({"gdtr", "ldtr", "descriptors"})


DR6_CAUSES = 0xE00F            # B0-B3, BD, BS, BT: what the CPU sets in DR6 at a #DB (SDM Vol. 3B 18.2.3)


class Deprivileged(MonitorOps):
    """The shared set-up and upkeep of a monitor that owns the real tables (module docstring)."""

    ring = 3                                        # the real ring the guest's ring 0 runs at
    vcpu_type: type[VCpu] = VCpu

    def attach(self, machine: Machine) -> None:
        self.m = machine
        v = self.vcpu = self.vcpu_type.from_machine(machine, self.ring)
        self.shadow = Shadow(machine, v)
        v.on_change = self.changed
        self.shadow.paging_changed()
        self._code: dict[int, int] = {}                 # real CS -> virtual CPL or -1
        self.routes: dict[tuple[str, int | None], Route] = self.routing()
        regs = machine.registers(("eflags", "cs", "ss", "esp", "eip"))
        ring = v.real_cpl(v.cpl)
        machine.enter(cs=v.real_selector(regs["cs"], v.cpl), eip=regs["eip"], esp=regs["esp"],
                      eflags=v.set_eflags(regs["eflags"]), cpl=ring, ss=v.real_selector(regs["ss"], v.cpl))
        for sreg in DATA_SEGMENTS:                  # reload the descriptor caches from the shadow GDT
            selector = machine.reg(sreg)
            machine.set_reg(sreg, selector if selector & 0xFFFC else 0)

    def routing(self) -> dict[tuple[str, int | None], Route]:
        """The intercept table (module docstring); empty: every event goes to the guest."""
        return {}

    # --- the virtual CPU followed by the real machine ------------------------------------------------------
    def changed(self, what: str) -> None:
        """The vcpu changed something the real machine follows (VCpu.on_change)."""
        work = FOLLOW.get(what)
        if work is not None:
            self.m.events.count("shadow", work)
            getattr(self.shadow, f"{work}_changed")()
        if what in TABLE_CHANGES:
            self._code.clear()
        self.followed(what)

    def followed(self, what: str) -> None:
        """After ``changed``: what the monitor itself redoes (bt: flush translations, forget segment bases)."""

    def sync_cpl(self, m: Machine) -> int:
        """Bring the vcpu's CPL up to date from the real CS (the guest may have changed rings by itself, by an
        iret or far transfer the monitor did not see); return that code segment's base (as loaded)."""
        cs = m.engine.read(UC_CS) & 0xFFFF
        cpl = self._code.get(cs)
        if cpl is None:
            cpl = self._code[cs] = self._code_cpl(m, cs)
        v = self.vcpu
        if cpl >= 0:
            v.cpl = cpl
        elif v.real_cpl(v.cpl) != cs & 3:       # conforming code keeps the caller's CPL, if it can
            v.cpl = cs & 3
        return m.engine.segment_base("cs")

    def _code_cpl(self, m: Machine, cs: int) -> int:
        """The virtual CPL of code the real CS selects, or -1 for "the caller's"."""
        v = self.vcpu
        cpl = cs & 3 if cs & 3 > v.ring or cs & 3 == 0 else -1     # rings above the compressed ones, and 0, are exact
        try:
            desc: Descriptor = v.space(m, mark=False).descriptor(cs, GP, 0)
        except GuestFault:
            return cpl
        if cpl < 0 and desc.is_code and not desc.conforming:
            cpl = desc.dpl
        return cpl

    # --- events ---------------------------------------------------------------------------------------------
    def intercept(self, machine: Machine, event: Interrupt) -> bool:
        route = self.routes.get((event.source, event.vector)) or self.routes.get((event.source, None))
        if route is None or not route(machine, event):
            self.reflect(machine, event)
        return True

    def hidden_page_fault(self, machine: Machine, event: Interrupt) -> bool:
        """A #PF that is the monitor's own (shadow paging: an entry filled on demand, an accessed or dirty bit
        to set in the guest's tables, an entry the guest made present unannounced): fixed, and the faulting
        instruction runs again, uncounted. False when the guest's tables do not allow the access."""
        cr2 = machine.reg("cr2")
        if not self.shadow.paging.hidden_fault(cr2, event.error_code):
            return False
        machine.events.count("shadow", "hidden-page-fault")
        self.sync_cpl(machine)
        if not event.fetch:                         # a fetch that faults is not counted in the first place
            machine.uncount()                       # the faulting attempt was the monitor's, not the guest's
        return True

    def reflect(self, machine: Machine, event: Interrupt) -> None:
        """Give ``event`` to the guest: through its virtual IDT at the virtual CPL. A #DB the real CPU
        raised (a single step) set its cause in the real DR6; the guest reads the virtual one (mov_dr)."""
        if event.vector == DB and event.source == EXCEPTION:
            self.vcpu.dr[6] |= machine.engine.read(UC_DR6) & DR6_CAUSES
        deliver(machine, self.vcpu, event)

    def reflect_fault(self, machine: Machine, fault: GuestFault, insn: int) -> None:
        """A fault an emulated instruction at ``insn`` raised for the guest."""
        self.reflect(machine, fault.event(insn))

    def io_allowed(self, machine: Machine, port: int, size: int) -> bool | None:
        """Port I/O that reaches the machine's hooks, checked for the virtual CPU: the real TR is the monitor's
        TSS, which has no I/O bitmap."""
        return self.vcpu.io_permitted(machine, port, size)

    def interrupts_enabled(self, machine: Machine) -> bool:
        return bool(self.vcpu.iflag)

    def state(self, machine: Machine) -> dict:
        return self.vcpu.state(machine)

    def detach(self, machine: Machine) -> None:
        if self.shadow.edits:
            machine.events.count("shadow", "guest-table-writes", self.shadow.edits)
