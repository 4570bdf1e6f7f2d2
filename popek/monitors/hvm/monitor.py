"""``hvm``: hardware-assisted virtualization (Intel VT-x, AMD-V), as the exits a control structure selects.

The guest runs unmodified at its own ring 0 on its own GDT, IDT, LDT, TSS and control registers: the real
machine *is* the guest's machine, as in VMX non-root operation. What leaves it for the monitor is decided
by the control set (``popek.monitors.hvm.controls``) and reported as the ISA description's ``model vtx``
/ ``model svm`` exit lines say (exit reason number and name; AMD exit code); nothing here lists exits in
code.

How exiting instructions are found. Unicorn has no non-root mode, and at CPL 0 cpuid, in/out, hlt, mov to
CR0 and the rest simply run. The monitor uses ``popek.machine.watch.Watch`` over exactly the instructions
that have an exit line whose controls can enable it: a code hook on each such address as the guest's blocks
reveal it, so a loop of N cpuid calls the monitor N times and 10,000 cli (no exit line) never call it, and
self-modifying code is re-classified. The hook decides from the controls and the operands (the CR0/CR4
guest/host masks, the I/O and MSR bitmaps, CR3 load/store exiting...) whether this execution exits; if
it does, it stops the chunk before the instruction with a pending exit, and the monitor then carries the
instruction out with the shared emulation routines (``popek.monitors.emulation``) against the guest's own
state (``popek.monitors.hvm.guest``: VM exit loads it, VM entry stores what changed). The alternative, the
binary translator with its callout set as a parameter, would translate all guest kernel code for the few
instructions that exit; the watch leaves every other instruction running natively, which is the point of
hardware assistance, and its counts do not depend on how code is split into blocks. Instructions that raise
#UD on this machine (VMX and SVM instructions, vmcall, vmmcall, rdpmc) are recognised at their #UD instead:
on hardware the exit takes precedence over the #UD.

Privilege first. An instruction whose CPL or IOPL check fails (hlt, mov cr, lgdt... at CPL 3; in/out
that the I/O permission check refuses) raises its #GP before any exit, as the SDM orders them; that #GP
exits only if the exception bitmap says so.

Events. Exceptions reach the monitor through the machine's intercept: one whose vector is in the exception
bitmap is an EXCEPTION_NMI exit (SVM: EXCPn), then goes to the guest's own IDT. Without nested paging
(``vtx-2005``) the monitor keeps shadow page tables (``GuestPaging``, the paging half of
``popek.monitors.shadow``): CR3 loads and stores and invlpg exit and resynchronise it, and each #PF exit is
either hidden (the guest's tables allow the access: fixed and resumed, the guest's CR2 untouched, as a #PF
exit does not write CR2) or a true guest fault, injected. With nested paging an access outside guest RAM is
an EPT_VIOLATION (SVM: NPF) exit, after which the guest gets what the bare machine gives it (#GP(0)).
External interrupts: with external-interrupt exiting, each interrupt request is an EXTERNAL_INTERRUPT exit;
the monitor injects it when the guest's IF allows, otherwise it sets interrupt-window exiting and injects
at the INTERRUPT_WINDOW exit. The run loop samples the interrupt line at the same guest instructions as
natively, so the guest takes its interrupts where it would natively. A triple fault is a TRIPLE_FAULT exit.

Equivalence: the same as native for every guest, except what the controls change on purpose: CPUID.1:ECX[31]
and the leaves 0x40000000+ with ``cpuid-hypervisor-bit`` (the bare machine reads 0 there and zeros, as the
hardware; ``popek.monitors.hvm.cpuid``). VMX and SVM instructions and vmcall/vmmcall exit
and then raise #UD in the guest, as KVM does for a guest without nested virtualization: popek's hvm offers
no hypercalls. rdpmc exits and raises #UD (the machine has no performance counters: natively it is #UD).

Counted (``machine.events``): ``exit`` by reason name, ``inject`` (interrupts given to the guest),
``shadow`` (``paging``: shadow page-table resynchronisations, ``hidden-page-fault``, ``page-fault``: a true
guest fault found by walking the guest's tables), ``hvm`` (the watch's
bookkeeping). ``--trace-exits`` keeps each exit in order with its qualification (``trace``).

Not modelled: the VMCS as memory (VMREAD/VMWRITE), nested virtualization, NMIs, the TPR shadow and APIC
virtualization, the preemption timer, PAE paging under shadow paging, unrestricted-guest real mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from popek.errors import UsageError
from popek.isa.language import bundled
from popek.isa.model import Exit
from popek.machine import ioperm
from popek.machine.faults import EXCEPTION, EXTERNAL, GP, PF, SOFTWARE, UD, GuestFault, Interrupt, name as vector_name
from popek.machine.result import TRIPLE_FAULT
from popek.machine.watch import Watch
from popek.monitors.base import MonitorOps
from popek.monitors.emulation import CR, DR, TABLE, count_elements, get_reg, rep_remaining
from popek.monitors.emulation.recipe import Recipe, decode, port_access
from popek.monitors.hvm import controls as control_sets
from popek.monitors.hvm import cpuid
from popek.monitors.hvm.guest import GuestState

if TYPE_CHECKING:
    from popek.machine.machine import Machine

VMEXIT = "vmexit"                       # the source of the pending event an exiting instruction stops on
# Instructions that are #UD on this machine: their exit is recognised at the #UD.
AT_UD = frozenset({"vmx", "vmcall", "svm", "vmmcall", "rdpmc"})
# Instructions whose exit is decided elsewhere (int n: at its software interrupt).
NOT_WATCHED = AT_UD | {"int"}
CR0_TS, CR0_PE = 1 << 3, 1
CR4_TSD = 1 << 2
IF = 1 << 9
TRACE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class ExitRecord:
    """One exit, for ``--trace-exits``: where, its reason as the vendor reports it, and its qualification."""

    address: int
    reason: int
    reason_name: str
    what: str
    qualification: str

    def render(self) -> str:
        return f"{self.address:08x}  {self.reason:#06x} {self.reason_name:<20} {self.what} {self.qualification}".rstrip()


class HardwareAssisted(MonitorOps):
    name = "hvm"

    def __init__(self, vendor: str | None = None, controls: str | None = None, control: tuple[str, ...] = (),
                 trace_exits: bool | Callable[[str], None] = False):
        """``trace_exits``: keep every exit in ``trace``; a callable also gets each one as a line when it
        happens (``--trace-exits``)."""
        if vendor not in (None, "vtx", "svm"):
            raise UsageError(f"--vendor must be vtx or svm, not {vendor!r}")
        self.controls = control_sets.load(controls or ("svm" if vendor == "svm" else "kvm"))
        for assignment in control:
            self.controls.set(assignment)
        c = self.controls
        self.vendor = vendor or c.vendor
        if not c["nested-paging"] and PF not in c["exception-bitmap"]:
            raise UsageError("without nested-paging the monitor keeps shadow page tables and needs #PF in the "
                             "exception-bitmap")
        isa = bundled()
        self.isa, self.model = isa, isa.model(self.vendor)
        self.trace: list[ExitRecord] | None = [] if trace_exits else None
        self._print = trace_exits if callable(trace_exits) else None
        self._recipes: dict[tuple[int, bytes], Recipe | None] = {}

    # --- set-up ------------------------------------------------------------------------------------------
    def attach(self, machine: Machine) -> None:
        self.m = machine
        self._exits = machine.events.counter("exit")
        self._shadow = machine.events.counter("shadow")
        self.guest = GuestState(machine, not self.controls["nested-paging"], self._count_shadow)
        if self.guest.paging is not None:
            self.guest.paging.paging_changed()
        self._cr2 = machine.reg("cr2")          # the CR2 the guest last saw (a #PF exit does not write CR2)
        self._pending: tuple[Exit, int | None, str, Recipe] | None = None
        self._requested = False                 # an interrupt request has exited and waits to be injected
        self._window = False                    # interrupt-window exiting is set
        self._triple = False                    # delivery_fault has seen the triple fault
        watched = {e.name for e in self.model.exits
                   if e.name in self.isa.instructions and e.name not in NOT_WATCHED and self._may_exit(e)}
        self.watch = Watch(machine, watched, self._on_insn, kind="hvm")

    def _may_exit(self, e: Exit) -> bool:
        """Whether any setting of ``e``'s controls can make it exit (only an optimisation of the watch set)."""
        if e.unconditional:
            return True
        values = [self.controls[k] for k in e.controls]
        return any(v is None or bool(v) for v in values)     # None: a bitmap that is off (everything exits)

    def _count_shadow(self, what: str) -> None:
        self._shadow[what] += 1

    # --- which exit, if any --------------------------------------------------------------------------------
    def _on_insn(self, address: int, name: str) -> None:
        m = self.m
        if m.event_pending:
            return
        eip = m.reg("eip")
        raw = self.watch.decoder.raw.get(address)
        key = (eip, raw)
        recipe = self._recipes.get(key)
        if recipe is None:
            recipe = self._recipes[key] = decode(raw, eip) if raw else None
        if recipe is None or recipe.name != name:
            return
        found = self._decide(m, recipe)
        if found is None:
            return
        self._pending = (*found, recipe)
        m.stop_chunk(Interrupt(0, VMEXIT, None, eip=eip, insn=eip, why=f"exit at {name}"))

    def _decide(self, m: Machine, r: Recipe) -> tuple[Exit, int | None, str] | None:
        """(exit line, register number or vector, qualification) when this execution of ``r`` exits."""
        name = r.name
        insn = self.isa.instructions[name]
        cpl = m.reg("cs") & 3
        if insn.privileged == "yes" and cpl:
            return None                         # its #GP comes first
        if name == "mov_cr" and r.operands[0].kind == CR and r.operands[0].number == 2:
            self._cr2 = get_reg(m, r.operands[1].reg)       # never exits; the guest's CR2 changes
            return None
        decide = DECIDE.get(name, _by_controls)
        found = decide(self, m, r)
        if found is None:
            return None
        when, n, qualification = found
        line = _line(self.model.exits_for(name), when)
        return (line, n, qualification) if line is not None else None

    def _on(self, key: str) -> bool:
        return bool(self.controls[key])

    def _exit(self, e: Exit, n: int | None, what: str, qualification: str, address: int) -> None:
        number, reason = e.reason_for(n)
        self._exits[reason] += 1
        if self.trace is not None and len(self.trace) < TRACE_MAX:
            record = ExitRecord(address, number, reason, what, qualification)
            self.trace.append(record)
            if self._print is not None:
                self._print(record.render())

    # --- the guest's events ----------------------------------------------------------------------------------
    def intercept(self, machine: Machine, event: Interrupt) -> bool:
        if event.source == VMEXIT:
            return self._emulate(machine, event)
        if event.source == EXCEPTION:
            if event.vector == UD:
                self._undefined(machine, event)
            if event.vector == GP and event.why.endswith("memory)") and self.controls["nested-paging"]:
                self._event_exit("ept-violation", None, event.why, event.eip)
            if event.vector in self.controls["exception-bitmap"]:
                self._exception_exit(event, "", event.eip)
                if event.vector == PF and self.guest.paging is not None:
                    return self._page_fault(machine, event.error_code)
        elif event.source == SOFTWARE and event.name in ("int3", "into"):
            if event.vector in self.controls["exception-bitmap"]:   # SDM 3C: the bitmap covers INT3 and INTO
                self._exception_exit(event, "", event.insn)
        elif event.source == SOFTWARE and event.name.startswith("int ") and self._on("swint-intercept"):
            line = self.model.exits_for("int")
            if line:
                self._exit(line[0], None, "int", event.name, event.insn)
        return False                             # the guest's own IDT, as on the bare machine

    def delivery_fault(self, machine: Machine, delivering: Interrupt, fault: Interrupt,
                       then: Interrupt | None) -> None:
        """An exception raised while delivering an event (SDM 3C "VM exits during event delivery"; the SDM's
        VMM programming considerations: an exit whose IDT-vectoring information is #DF is the guest's triple
        fault, which the monitor does not re-inject; AMD APM Vol. 2 15.7.2, EXITINTINFO): it exits
        if its vector is in the exception bitmap, the IDT-vectoring information recording the event being
        delivered; if it does not, the #DF the CPU makes of the pair is checked in turn, and a fault while
        delivering #DF that does not exit is a triple fault (TRIPLE_FAULT; SVM: SHUTDOWN). After an exit the
        monitor lets the delivery go on as on the bare machine (it re-injects what the CPU would deliver)."""
        bitmap = self.controls["exception-bitmap"]
        vectoring = f" (IDT-vectoring: {delivering.name})"
        exits = fault.vector in bitmap
        if exits:
            self._exception_exit(fault, vectoring, delivering.insn)
        if then is None:
            self._triple = True
            if not exits:
                self._event_exit("triple-fault", None, f"{fault.name} while delivering {delivering.name}",
                                 delivering.insn)
        elif then is not fault and not exits and then.vector in bitmap:
            self._exception_exit(then, vectoring, delivering.insn)

    def _exception_exit(self, event: Interrupt, after: str, address: int) -> None:
        code = "" if event.error_code is None else f" error {event.error_code:#x}"
        self._event_exit("exception", event.vector, f"{vector_name(event.vector)}{code}{after}", address)

    def _event_exit(self, what: str, n: int | None, qualification: str, address: int) -> None:
        lines = self.model.exits_for(what)
        if lines:
            self._exit(lines[0], n, what, qualification, address)

    def _page_fault(self, m: Machine, error_code: int | None) -> bool:
        """A #PF exit under shadow paging: hidden (resync and resume) or the guest's own (inject)."""
        self.guest.load()
        if self.guest.paging.hidden_fault(m.reg("cr2"), error_code):
            self._shadow["hidden-page-fault"] += 1
            m.set_cr2(self._cr2)
            return True
        self._shadow["page-fault"] += 1         # the guest's tables refuse it too: a true fault, injected
        self._cr2 = m.reg("cr2")
        return False

    def _undefined(self, m: Machine, event: Interrupt) -> None:
        """A #UD at an instruction that exits instead on hardware (AT_UD): count that exit; the guest then
        gets the #UD (this monitor offers no VMX, SVM or hypercalls to its guest)."""
        try:
            r = decode(m.read_linear(event.eip, 15), event.eip)
        except GuestFault:
            return
        if r is None or r.name not in AT_UD or (r.name == "rdpmc" and (m.reg("cs") & 3) and not m.reg("cr4") & 0x100):
            return
        mnemonic = r.text.split()[0]
        line = _line(self.model.exits_for(r.name), mnemonic)
        if line is not None and (line.unconditional or self._may_exit(line)):
            self._exit(line, None, r.name, mnemonic, event.eip)

    def _emulate(self, m: Machine, event: Interrupt) -> bool:
        """The pending exiting instruction: count the exit, carry the instruction out against the guest's own
        state, resume after it (or deliver the fault it raised through the guest's IDT)."""
        line, n, qualification, r = self._pending
        self._pending = None
        self._exit(line, n, r.name, qualification, event.eip)
        v = self.guest.load()
        count = rep_remaining(m, r)
        try:
            eip = EMULATE.get(r.name, _routine)(self, m, v, r)
        except GuestFault as fault:
            eip = None
            self.guest.store()
            m.deliver(fault.event(event.eip))
        else:
            self.guest.store()
            m.set_reg("eip", eip)               # (the machine counted the instruction when its hook stopped it)
        count_elements(m, r, count)             # (emulated whole in one exit: counted as natively)
        return True

    # --- interrupts ---------------------------------------------------------------------------------------
    def take_interrupt(self, machine: Machine) -> bool:
        m = machine
        if m.end is not None or not m.pic.pending() or not self._on("external-interrupt-exiting"):
            return super().take_interrupt(m)
        if not self._requested:
            self._requested = True
            self._event_exit("external-interrupt", None, "irq pending at the PIC", m.reg("eip"))
        if not m.interrupts_enabled():
            self._window = True                 # interrupt-window exiting: exit when IF becomes 1
            return False
        if self._window:
            self._window = False
            self._event_exit("interrupt-window", None, "IF=1: inject", m.reg("eip"))
        self._requested = False
        vector = m.pic.acknowledge()
        eip = m.reg("eip")
        m.halted = False
        m.events.count("inject", f"vector {vector:#x}")
        m.raise_interrupt(Interrupt(vector, EXTERNAL, None, eip=eip, insn=eip, why="injected"))
        return True

    def detach(self, machine: Machine) -> None:
        if machine.end is not None and machine.end.reason == TRIPLE_FAULT and not self._triple:
            # (the machine's own rule: too many nested handler faults; delivery_fault saw the others)
            self._event_exit("triple-fault", None, machine.end.why, machine.reg("eip"))

    def state(self, machine: Machine) -> dict:
        s = machine.state()
        if self.guest.paging is not None:
            s["cr3"] = self.guest.v.cr3         # the real CR3 is the shadow page directory
        return s


def _line(lines: tuple[Exit, ...], when: str | None) -> Exit | None:
    """The exit line qualified by ``when`` (read/write, a mnemonic), else the unqualified one."""
    return next((e for e in lines if when is not None and e.when == when), None) or \
        next((e for e in lines if e.when is None), None)


# --- deciders: (when, register number or vector, qualification) if this execution exits -----------------
def _by_controls(hv: HardwareAssisted, m: Machine, r: Recipe):
    """The exit line's controls are switches: any on (or ``always``) exits."""
    lines = hv.model.exits_for(r.name)
    if not lines:
        return None
    e = lines[0]
    if not e.unconditional and not any(hv._on(k) for k in e.controls):
        return None
    if r.name == "rdtsc" and m.reg("cr4") & CR4_TSD and m.reg("cs") & 3:
        return None                             # #GP first
    qualification = f"leaf {m.reg('eax'):#x}" if r.name == "cpuid" else ""
    return None, None, qualification


def _cr(hv: HardwareAssisted, m: Machine, r: Recipe):
    c = hv.controls
    if r.name == "clts":
        owned = c["cr0-mask"] & CR0_TS and m.reg("cr0") & CR0_TS
        return ("write", 0, "clts") if owned else None
    if r.name == "lmsw":
        cr0 = m.reg("cr0")
        value = get_reg(m, r.operands[0].reg) if r.operands[0].kind != "mem" else None
        if value is None:
            return "write", 0, "lmsw (memory)"  # conservatively exits: the source is read by the routine
        new = (cr0 & ~0xE) | (value & 0xF) | (cr0 & CR0_PE)
        return ("write", 0, f"lmsw {value:#x}") if (new ^ cr0) & c["cr0-mask"] & 0xF else None
    dst, src = r.operands
    if dst.kind == CR:
        n, value = dst.number, get_reg(m, src.reg)
        if n in (0, 4):
            mask = c[f"cr{n}-mask"]
            return ("write", n, f"CR{n} write from {src.reg} ({value:#x})") \
                if (value ^ m.reg(f"cr{n}")) & mask else None
        if n == 3 and c["cr3-load-exiting"]:
            return "write", 3, f"CR3 write from {src.reg} ({value:#x})"
        return None
    if src.number == 3 and c["cr3-store-exiting"]:
        return "read", 3, f"CR3 read into {dst.reg}"
    return None                                 # CR0/CR4 reads: the read shadow, no exit


def _dr(hv: HardwareAssisted, m: Machine, r: Recipe):
    if not hv._on("mov-dr-exiting"):
        return None
    dst, src = r.operands
    if dst.kind == DR:
        return "write", dst.number, f"DR{dst.number} write from {src.reg}"
    return "read", src.number, f"DR{src.number} read into {dst.reg}"


def _io(hv: HardwareAssisted, m: Machine, r: Recipe):
    port, size, inbound = port_access(r, m.reg("edx"))
    cpl, iopl = m.reg("cs") & 3, (m.reg("eflags") >> 12) & 3
    if cpl > iopl and not ioperm.bitmap_allows(m.address_space(), m.table("tr"), port, size):
        return None                             # the #GP of the I/O permission check comes first
    bitmap = hv.controls["io-bitmap"]
    exits = any(p & 0xFFFF in bitmap for p in range(port, port + size)) if bitmap is not None \
        else hv._on("unconditional-io-exiting")
    if not exits:
        return None
    kind = " string" + (" rep" if r.rep else "") if r.name in ("ins", "outs") else ""
    return None, None, f"{'in' if inbound else 'out'} port {port:#x} size {size}{kind}"


def _msr(hv: HardwareAssisted, m: Machine, r: Recipe):
    number, bitmap = m.reg("ecx"), hv.controls["msr-bitmap"]
    if bitmap is not None and number not in bitmap:
        return None
    return None, None, f"{'read' if r.name == 'rdmsr' else 'write'} msr {number:#x}"


DECIDE = {"mov_cr": _cr, "clts": _cr, "lmsw": _cr, "mov_dr": _dr, "in": _io, "out": _io, "ins": _io, "outs": _io,
          "rdmsr": _msr, "wrmsr": _msr}


# --- emulation: the shared routines, and cpuid ----------------------------------------------------------------
def _routine(hv: HardwareAssisted, m: Machine, v, r: Recipe) -> int:
    return TABLE[r.name](m, v, r)


def _cpuid(hv: HardwareAssisted, m: Machine, v, r: Recipe) -> int:
    c = hv.controls
    values = cpuid.guest(m.reg("eax"), m.reg("ecx"), m.reg("cr4"), m.engine.xcr0(), c["cpuid-hypervisor-bit"],
                         c["cpuid-vendor"])
    for reg, value in zip(("eax", "ebx", "ecx", "edx"), values):
        m.set_reg(reg, value)
    return r.next


EMULATE = {"cpuid": _cpuid}
