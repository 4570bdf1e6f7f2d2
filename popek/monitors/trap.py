"""``trap``: classic trap-and-emulate on IA-32, the technique Popek and Goldberg's Theorem 1 is about.

The guest kernel runs deprivileged at real ring ``ring`` (3 by default, 1 as real VMMs used) on the
monitor's own GDT, IDT and TSS (``popek.monitors.shadow``: ring-compressed copies of the guest's tables in
monitor memory); its real CS and SS are the guest's selectors with RPL ``ring``. The real EFLAGS keep
IF = 1 and IOPL = 0, so cli, sti and port I/O fault like the privileged instructions.

What the monitor sees, and does (``intercept``):
- **#GP at an instruction with an emulation routine** (``popek.monitors.emulation.TABLE``): a *trap*. The
  instruction is decoded once per address (``Recipes``) and emulated against the virtual CPU
  (``popek.monitors.vcpu``), then EIP moves past it. If the instruction faults at the virtual CPL (cli in
  guest user mode, lgdt at virtual CPL 3...), that fault is delivered to the guest instead. The privileged
  and I/O instructions always get here; so do the sensitive ones in the rare cases where they fault at
  the real ring (see below).
- **every other exception, and every software and external interrupt**: delivered to the guest through
  its *virtual* IDT at the virtual CPL (gate DPL checks, stack switch from the guest's TSS, a frame with
  the virtual EFLAGS and CS/SS RPL). A page fault takes the virtual CR2. The timer is injected only when
  the virtual IF allows it (``interrupts_enabled``).

The virtual CPL follows the guest across transfers the monitor does not see: at every entry it is the
DPL the *guest* gave the code segment in the real CS (the monitor performs every transfer that needs it
to know more: deliveries and emulated far transfers).

What the guest gets wrong, exactly as on IA-32 (the sensitive-unprivileged instructions run unmodified and
the monitor never sees them):
- ``sgdt``/``sidt`` store the shadow tables' bases in monitor memory and limits 0xFFFF / 0x7FF;
  ``sldt`` 0xFFF0 when the guest has an LDT, ``str`` 0xFFF8 (the monitor's own TSS);
- ``smsw`` the real CR0's low word: PE|ET plus the guest's MP, EM and TS (not NE: ``shadow.CR0_PASS``);
- ``pushf`` the real IF (1) and IOPL (0); ``popf`` silently keeps both, so a guest cannot turn
  interrupts off (or on) with it and a later ``cli``/``sti`` is the only way the monitor hears of IF;
- ``push cs``/``push ss``/``mov r, cs``/``mov r, ss`` show RPL ``ring``;
- ``lar``/``lsl``/``verr``/``verw`` answer for the ring-compressed shadow descriptors at the real CPL;
- ``mov``/``pop`` to DS, ES, FS, GS and SS are checked at the real CPL against compressed DPLs: ring-3
  selectors load where a ring-0 kernel faults (``mov ss`` with RPL 3); an SS load with RPL 0 faults at
  the real ring and is emulated, correctly;
- far ``jmp``/``call``/``ret`` run at the real CPL: a kernel may far-jump to user code; a call gate into
  the guest kernel does not switch stacks under ``ring=3`` (the target's DPL is compressed to 3); a
  ``retf`` to an RPL-0 frame faults and is emulated;
- ``iret`` from the guest kernel to an RPL-``ring``-or-above frame runs unmodified: under ``ring=3`` a
  return to user mode is a *same-ring* return that pops EIP, CS and EFLAGS only, not SS:ESP (user code
  runs on the kernel stack); IF and IOPL in the popped EFLAGS are ignored (the virtual IF is unchanged).
  An ``iret`` to an RPL-0 frame (kernel to kernel: the frames the monitor pushes carry RPL 0) faults and
  is emulated with the full virtual semantics;
- ``int n`` is not a divergence: every interrupt reaches the monitor, which applies the guest's gate DPL.
Memory the CPU writes by itself: accessed bits and the busy bit go to the shadow tables, which have them
preset; the guest's own tables keep them as the guest wrote them (``ltr`` sets busy, as the CPU would).

Port I/O. ``in``/``out`` are decided inside the machine's I/O hook (``io_allowed``): the virtual
permission check (virtual CPL and IOPL, else the guest's own TSS bitmap), then the access completes, which
is what trap, emulate and resume would do without leaving Unicorn. ``ins``/``outs`` take the #GP path and
are emulated whole, so a ``rep`` instruction is one trap, as on hardware.

Events (``machine.events``): ``trap`` (every trap, by canonical name: a #GP at an instruction with a
routine, or a port access the real CPU refused), ``emulate`` (those carried out; the rest became a fault for
the guest), ``inject`` (external interrupts given to the guest), what the guest's virtual IDT receives
under the machine's names (``exception``, ``software-interrupt``, ``external-interrupt``,
``delivery-fault``), and ``shadow``: rebuilds (``gdt``, ``ldt``, ``tss``, ``paging``), ``hidden-page-fault``
and ``guest-table-writes`` (stores into the guest's GDT, LDT or TSS stack fields, traced).

Not modelled: real mode (a guest clearing CR0.PE keeps running in protected mode), virtual-8086 mode, task
switches, PAE paging; see ``popek.monitors.shadow`` for the paging limits and ``popek.monitors.emulation``
for the routines'.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn.x86_const import UC_X86_REG_CS as UC_CS, UC_X86_REG_EIP as UC_EIP

from popek.errors import UsageError
from popek.machine import ioperm
from popek.machine.descriptors import Descriptor
from popek.machine.faults import ERROR_CODE, EXCEPTION, EXTERNAL, GP, PF, GuestFault, Interrupt
from popek.monitors.base import MonitorOps
from popek.monitors.emulation import TABLE, Recipes
from popek.monitors.shadow import Shadow
from popek.monitors.vcpu import VCpu, deliver

if TYPE_CHECKING:
    from popek.machine.machine import Machine

SEGMENTS = ("ds", "es", "fs", "gs")
# What the shadow structures redo when the vcpu changes (VCpu.on_change): event name and Shadow method.
_SHADOW_WORK = {"gdtr": "gdt", "ldtr": "ldt", "tr": "tss", "cr0": "paging", "cr3": "paging", "cr4": "paging",
                "tlb": "paging"}
IN_OUT = frozenset({"in", "out"})


class TrapAndEmulate(MonitorOps):
    name = "trap"

    def __init__(self, ring: int = 3):
        if ring not in (1, 2, 3):
            raise UsageError(f"--ring must be 1, 2 or 3 for trap-and-emulate, not {ring}")
        self.ring = ring
        self.recipes = Recipes()
        self._code: dict[int, tuple[int, int]] = {}     # real CS -> (virtual CPL, base)

    def attach(self, machine: Machine) -> None:
        self._traps, self._emulated = machine.events.counter("trap"), machine.events.counter("emulate")
        v = self.vcpu = VCpu.from_machine(machine, self.ring)
        self.shadow = Shadow(machine, v)
        v.on_change = self._changed
        self.shadow.paging_changed()
        regs = machine.registers(("eflags", "cs", "ss", "esp", "eip"))
        ring = v.real_cpl(v.cpl)
        machine.enter(cs=v.real_selector(regs["cs"], v.cpl), eip=regs["eip"], esp=regs["esp"],
                      eflags=v.set_eflags(regs["eflags"]), cpl=ring, ss=v.real_selector(regs["ss"], v.cpl))
        for sreg in SEGMENTS:                       # reload the descriptor caches from the shadow GDT
            selector = machine.reg(sreg)
            machine.set_reg(sreg, selector if selector & 0xFFFC else 0)

    def _changed(self, what: str) -> None:
        """The vcpu changed something the real machine follows (see VCpu.on_change)."""
        shadow = self.shadow
        work = _SHADOW_WORK.get(what)
        if work is not None:
            shadow.m.events.count("shadow", work)
            getattr(shadow, f"{work}_changed")()
        if what in ("gdtr", "ldtr", "descriptors"):
            self._code.clear()                      # the virtual CPL of a code selector may differ now

    # --- the virtual CPL ----------------------------------------------------------------------------------
    def _code_segment(self, m: Machine) -> int:
        """Bring the vcpu's CPL up to date from the real CS; the base of that code segment."""
        cs = m.engine.read(UC_CS) & 0xFFFF
        known = self._code.get(cs)
        if known is None:
            known = self._code[cs] = self._derive(m, cs)
        v = self.vcpu
        if known[0] >= 0:
            v.cpl = known[0]
        elif v.real_cpl(v.cpl) != cs & 3:       # conforming code keeps the caller's CPL, if it can
            v.cpl = cs & 3
        return known[1]

    def _derive(self, m: Machine, cs: int) -> tuple[int, int]:
        """(virtual CPL or -1 for "the caller's", base) of the code segment the real CS selects."""
        v = self.vcpu
        cpl = cs & 3 if cs & 3 > v.ring else -1     # rings above the compressed ones are exact
        try:
            desc: Descriptor = v.space(m).descriptor(cs, GP, 0)
        except GuestFault:
            return cpl, 0
        if cpl < 0 and desc.is_code and not desc.conforming:
            cpl = desc.dpl
        return cpl, desc.base

    # --- events --------------------------------------------------------------------------------------------
    def intercept(self, machine: Machine, event: Interrupt) -> bool:
        v = self.vcpu
        cs_base = self._code_segment(machine)
        if event.vector == GP and event.source == EXCEPTION:
            try:
                recipe = self.recipes.get(machine, v, event.eip, cs_base)
            except GuestFault:
                recipe = None
            routine = TABLE.get(recipe.name) if recipe is not None else None
            if routine is not None:
                self._traps[recipe.name] += 1
                try:
                    eip = routine(machine, v, recipe)
                except GuestFault as fault:
                    self._reflect(machine, fault, event.eip)
                    return True
                self._emulated[recipe.name] += 1
                machine.engine.write(UC_EIP, eip)
                return True
        elif event.vector == PF and event.source == EXCEPTION:
            if self.shadow.paging_changed():
                machine.events.count("shadow", "hidden-page-fault")
                machine.uncount()                   # the faulting attempt was the monitor's, not the guest's
                return True                         # the guest's tables allow it now: run it again
            v.cr2 = machine.reg("cr2")
            if event.error_code is not None:        # U/S: the virtual privilege, not the real one
                event.error_code = (event.error_code & ~4) | (4 if v.cpl == 3 else 0)
        elif event.source == EXTERNAL:
            machine.events.count("inject", event.name)
        deliver(machine, v, event)
        return True

    def io_allowed(self, machine: Machine, port: int, size: int) -> bool:
        """An in/out the real CPU would refuse (IOPL 0, no bitmap): trap and emulate it in the I/O hook,
        with the virtual permission check. String I/O is refused here and emulated whole after its #GP, so
        that a ``rep`` instruction is one trap, as on hardware."""
        v = self.vcpu
        cs_base = self._code_segment(machine)
        try:
            recipe = self.recipes.get(machine, v, machine.engine.read(UC_EIP), cs_base)
        except GuestFault:
            return False
        if recipe is None or recipe.name not in IN_OUT:
            return False
        if v.cpl > v.iopl and not ioperm.bitmap_allows(v.space(machine), tuple(v.tr), port, size):
            return False                            # the #GP path delivers the virtual #GP
        self._traps[recipe.name] += 1
        self._emulated[recipe.name] += 1
        return True

    def _reflect(self, m: Machine, fault: GuestFault, eip: int) -> None:
        if fault.vector == PF and fault.address is not None:
            self.vcpu.cr2 = fault.address
        code = fault.error_code if fault.vector in ERROR_CODE else None
        deliver(m, self.vcpu, Interrupt(fault.vector, EXCEPTION, code, eip=eip, insn=eip, why=fault.why))

    def interrupts_enabled(self, machine: Machine) -> bool:
        return bool(self.vcpu.iflag)

    def state(self, machine: Machine) -> dict:
        self._code_segment(machine)                 # the guest may have changed rings since the last trap
        return self.vcpu.state(machine)

    def detach(self, machine: Machine) -> None:
        if self.shadow.edits:
            machine.events.count("shadow", "guest-table-writes", self.shadow.edits)
