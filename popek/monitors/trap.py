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
``delivery-fault``), and ``shadow``: rebuilds (``gdt``, ``ldt``, ``tss``, ``paging``), ``hidden-page-fault``,
``page-fault`` (a true guest fault) and ``guest-table-writes`` (stores into the guest's GDT, LDT or TSS stack
fields, traced).

The virtual CPL after a change of rings the monitor did not see (an ``iret`` or far return that ran at the
real ring) is read from the guest's descriptor of the new CS; the loaded DPL is the compressed ring. A
descriptor the guest rewrites while its segment is loaded then gives the CPL the table says, where the CPU
keeps the one it loaded.

Not modelled: real mode (a guest clearing CR0.PE keeps running in protected mode), virtual-8086 mode, task
switches, PAE paging; see ``popek.monitors.shadow`` for the paging limits and ``popek.monitors.emulation``
for the routines'.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn.x86_const import UC_X86_REG_EIP as UC_EIP

from popek.errors import UsageError
from popek.machine.faults import EXCEPTION, EXTERNAL, GP, PF, GuestFault, Interrupt
from popek.monitors.deprivilege import Deprivileged
from popek.monitors.emulation import TABLE, Recipes, count_elements, rep_remaining

if TYPE_CHECKING:
    from popek.machine.machine import Machine

IN_OUT = frozenset({"in", "out"})


class TrapAndEmulate(Deprivileged):
    name = "trap"

    def __init__(self, ring: int = 3):
        if ring not in (1, 2, 3):
            raise UsageError(f"--ring must be 1, 2 or 3 for trap-and-emulate, not {ring}")
        self.ring = ring
        self.recipes = Recipes()

    def attach(self, machine: Machine) -> None:
        self._traps, self._emulated = machine.events.counter("trap"), machine.events.counter("emulate")
        super().attach(machine)

    def routing(self):
        return {(EXCEPTION, GP): self._on_gp, (EXCEPTION, PF): self._on_pf, (EXTERNAL, None): self._on_external}

    # --- events --------------------------------------------------------------------------------------------
    def intercept(self, machine: Machine, event: Interrupt) -> bool:
        self._cs_base = self.sync_cpl(machine)      # every route and the reflection use the virtual CPL
        return super().intercept(machine, event)

    def _on_gp(self, machine: Machine, event: Interrupt) -> bool:
        """A #GP at an instruction with an emulation routine: a trap. Emulate it and move past it."""
        v = self.vcpu
        try:
            recipe = self.recipes.get(machine, v, event.eip, self._cs_base)
        except GuestFault:
            return False
        routine = TABLE.get(recipe.name) if recipe is not None else None
        if routine is None:
            return False
        self._traps[recipe.name] += 1
        elements = rep_remaining(machine, recipe)
        try:
            eip = routine(machine, v, recipe)
        except GuestFault as fault:
            count_elements(machine, recipe, elements)
            self.reflect_fault(machine, fault, event.eip)
            return True
        count_elements(machine, recipe, elements)   # (a rep ins/outs: emulated whole, counted as natively)
        self._emulated[recipe.name] += 1
        machine.engine.write(UC_EIP, eip)
        return True

    def _on_pf(self, machine: Machine, event: Interrupt) -> bool:
        if self.hidden_page_fault(machine, event):
            return True                             # the guest's tables allow it now: run it again
        machine.events.count("shadow", "page-fault")   # the guest's tables refuse it too: a true fault
        event.address = machine.reg("cr2")
        if event.error_code is not None:            # U/S: the virtual privilege, not the real one
            event.error_code = (event.error_code & ~4) | (4 if self.vcpu.cpl == 3 else 0)
        return False

    def _on_external(self, machine: Machine, event: Interrupt) -> bool:
        machine.events.count("inject", event.name)
        return False

    def io_allowed(self, machine: Machine, port: int, size: int) -> bool:
        """An in/out the real CPU would refuse (IOPL 0, no bitmap): trap and emulate it in the I/O hook,
        with the virtual permission check. String I/O is refused here and emulated whole after its #GP, so
        that a ``rep`` instruction is one trap, as on hardware."""
        v = self.vcpu
        try:
            recipe = self.recipes.get(machine, v, machine.engine.read(UC_EIP), self.sync_cpl(machine))
        except GuestFault:
            return False
        if recipe is None or recipe.name not in IN_OUT:
            return False
        if not v.io_permitted(machine, port, size):
            return False                            # the #GP path delivers the virtual #GP
        self._traps[recipe.name] += 1
        self._emulated[recipe.name] += 1
        return True

    def state(self, machine: Machine) -> dict:
        self.sync_cpl(machine)                      # the guest may have changed rings since the last trap
        return super().state(machine)
