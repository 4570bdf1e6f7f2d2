"""``pv``: paravirtualization on Xen's 32-bit PV ABI (docs/pv.md is the guest's contract).

The guest kernel is ported: it runs at ring 1 and asks the hypervisor, by ``int 0x82`` hypercalls, for
what a ring-0 kernel does itself. The monitor is a ``Deprivileged`` one (the real GDT, IDT and TSS are its
own, in monitor memory) with the kernel's ring 1 real, not compressed: the virtual CPL is the real one.
What differs from ``trap`` is data: the route table has a row for ``int 0x82`` (the hypercall table
``HYPERCALLS``, number -> handler), the virtual CPU's ``gate`` reads the guest's trap table instead of an
IDT, and the platform hooks are event channels and a one-shot timer instead of the PIC and PIT.

Boot (``attach``): CS = FLAT_RING1_CS 0xE019, the data segments and SS = FLAT_RING1_DS 0xE021, ESP
0x90000, ESI = start_info (RAM top - 0x2000), shared_info at RAM top - 0x1000, EFLAGS 0x202 with events
masked. Xen's four flat segments sit in the reserved top of the real GDT (entries 7171-7174), above the
guest's own descriptors, and stay whatever GDT the guest installs.

Choices where the ABI page leaves one, and simplifications (docs/pv.md says the same for users):
- The bounce frame (trap-table delivery and upcalls) pushes EFLAGS with IF = not evtchn_upcall_mask, as
  Xen's create_bounce_frame does; ``pushf`` itself shows the real IF = 1. A trap-table entry with
  flags & 4 sets the mask on entry (Xen's "interrupt gate"); a return restores it only if the guest's own
  code does (Linux's xen_iret: the platform layer's ``kiret``).
- Direct trap: an ``int n`` from ring 3 through an entry of DPL 3 without flags & 4 is counted as
  ``direct-trap``, not as hypervisor work: Xen puts such a gate in the real IDT (it cannot for an entry
  that masks events, which needs the hypervisor to set the mask, so those are bounced and counted as
  ``reflect``).
- set_trap_table: an entry's ``cs`` with RPL 0 is taken as RPL 1 (Xen's fixup_guest_code_selector); a
  ``cs`` that is none of the guest's GDT/LDT selectors nor FLAT_RING1_CS is -EPERM (Xen's
  guest_gate_selector_okay), earlier entries stay; a null table clears the trap table; more than
  ``MAX_TRAP_ENTRIES`` entries is -EINVAL (Xen would keep reading).
- set_gdt: the frames must be consecutive page numbers (popek keeps one linear table: -EINVAL otherwise;
  Xen takes any frames); a descriptor that fails validation is -EINVAL and nothing changes. While
  installed, the frames are read-only to the guest: a guest store there is #GP(0) (the machine's fault
  for a write to a read-only page; Xen's is #PF), and descriptors change through update_descriptor. The
  hypervisor's own writes go through ``PvSpace.write`` and refuse them too: a hypercall write-back is
  -EFAULT, a bounce frame there crashes the domain. start_info's and shared_info's frames cannot be a GDT.
- update_descriptor: a machine address that is not 8-aligned, or not in guest RAM, is -EINVAL (Xen:
  a bad MFN is -EINVAL).
- stack_switch: SS with RPL 0 is taken as RPL 1; any other RPL but 1 is -EINVAL. The stack also becomes
  the real TSS's ring-1 stack, as in Xen, so a call gate from ring 3 switches to it.
- event_channel_op: bind_virq takes the lowest free port from 1 (Xen keeps port 0 reserved); binding a
  bound VIRQ is -EEXIST, an unknown VIRQ -EINVAL, a vCPU other than 0 -ENOENT. ``send`` on a bound port
  marks it pending (an event to itself; Xen accepts send only on IPI and interdomain ports), on an unbound
  or out-of-range port -EINVAL. ``unmask`` clears the mask bit and raises the upcall if the port is
  pending.
- A multicall inside a multicall gets -EINVAL as that entry's result (Xen: "Multicall reentry is
  disallowed"); an array not wholly in guest RAM is -EFAULT before any entry runs; after
  ``MULTICALL_BATCH`` entries the hypercall is continued (EBX/ECX advanced, ``int 0x82`` again).
- sched_op(shutdown): the run ends with reason ``shutdown`` and the reason's low byte as its code
  (Xen's domain_shutdown(d, (u8)reason)).
- rdpmc outside ring 0 is #GP(0) (CR4.PCE = 0); Unicorn's #UD is turned into it.
- The domain crashes (end reason ``crash``, with the vector, EIP, the instruction and, for a privileged
  instruction, what a PV kernel does instead) when an event has no trap-table entry, an upcall is due with
  no event callback set, an upcall frame cannot be written, or a delivery keeps faulting (where the bare
  machine would triple-fault: e.g. a trap table whose entries name a selector that is not code).
- Not modelled: paging (mmu_update, update_va_mapping, mmuext_op return -ENOSYS; the guest runs with
  paging off, guest-physical = machine), the failsafe callback (the guest returns with the real iret and
  a bad frame faults as on hardware), an LDT, more than one vCPU, I/O privilege by physdev_op.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import unicorn

from popek.decode import decode_at
from popek.errors import UsageError
from popek.events import REFLECT
from popek.machine import interrupts
from popek.machine.descriptors import Descriptor
from popek.machine.faults import EXCEPTION, EXTERNAL, GP, NP, PF, SOFTWARE, TS, UD, GuestFault, Interrupt
from popek.machine.memory import AddressSpace
from popek.machine.result import CRASH, SHUTDOWN, TRIPLE_FAULT
from popek.monitors import pv_abi as X
from popek.monitors.deprivilege import Deprivileged
from popek.monitors.emulation.recipe import Recipes, decode
from popek.monitors.shadow import TABLE_SIZE, compress
from popek.monitors.vcpu import IF, IOPL, VCpu

if TYPE_CHECKING:
    from popek.machine.machine import Machine

UPCALL = 0x100                      # the vector of an upcall on its way (not an IA-32 vector)
MAX_TRAP_ENTRIES = 4096
MULTICALL_BATCH = 64                # multicall entries per entry into the hypervisor (Xen's preemption point)
INTERRUPT_GATE, TRAP_GATE = 0xE, 0xF

# What a PV kernel does instead of a privileged instruction (the crash message of an unported guest).
INSTEAD = {
    "cli": "a PV kernel sets evtchn_upcall_mask in shared_info",
    "sti": "a PV kernel clears evtchn_upcall_mask in shared_info",
    "hlt": "a PV kernel calls HYPERVISOR_sched_op(SCHEDOP_block)",
    "lgdt": "a PV kernel calls HYPERVISOR_set_gdt",
    "lidt": "a PV kernel calls HYPERVISOR_set_trap_table",
    "ltr": "a PV kernel has no TSS: HYPERVISOR_stack_switch sets its stack",
    "lldt": "a PV kernel calls HYPERVISOR_mmuext_op(MMUEXT_SET_LDT)",
    "mov_cr": "a PV kernel asks for paging changes with HYPERVISOR_mmuext_op and mmu_update",
    "invlpg": "a PV kernel calls HYPERVISOR_mmuext_op(MMUEXT_INVLPG_LOCAL)",
    "mov_dr": "a PV kernel calls HYPERVISOR_set_debugreg",
    "clts": "a PV kernel calls HYPERVISOR_fpu_taskswitch",
    "lmsw": "a PV kernel leaves CR0 to the hypervisor",
    "wbinvd": "a PV kernel leaves cache flushes to the hypervisor",
    "invd": "a PV kernel leaves cache flushes to the hypervisor",
    "rdmsr": "a PV kernel does not read MSRs itself",
    "wrmsr": "a PV kernel does not write MSRs itself",
    "in": "not a granted port (the domain has 0x3f8-0x3ff and 0xf4)",
    "out": "not a granted port (the domain has 0x3f8-0x3ff and 0xf4)",
    "ins": "not a granted port (the domain has 0x3f8-0x3ff and 0xf4)",
    "outs": "not a granted port (the domain has 0x3f8-0x3ff and 0xf4)",
}
PORT_IO = frozenset({"in", "out", "ins", "outs"})


def _kernel_code(raw: bytes) -> bool:
    """A code segment the guest kernel may run (a call gate's valid target)."""
    d = Descriptor.from_bytes(raw)
    return not d.system and d.is_code and d.dpl >= X.KERNEL_RING


class Crash(Exception):
    """The domain crashes (Xen's domain_crash): the run ends with reason ``crash``."""


class ReadOnlyFrame(GuestFault):
    """A hypervisor write into an installed GDT frame (``PvSpace.write``)."""


class BounceFailed(Crash):
    """A bounce frame that could not be written: Xen's create_bounce_frame crashes the domain at once."""


class Continuation(Exception):
    """A hypercall preempted with work left (Xen's hypercall_create_continuation): the guest re-executes
    ``int 0x82`` with these argument registers."""

    def __init__(self, **registers: int):
        super().__init__(registers)
        self.registers = registers


class Errno(Exception):
    """A hypercall fails with -errno."""

    def __init__(self, errno: int):
        super().__init__(errno)
        self.errno = errno


class PvSpace(AddressSpace):
    """The guest's address space as the hypervisor writes into it: every hypervisor write to guest memory
    (bounce frames, hypercall write-backs, emulated instructions) goes through ``write`` here, which refuses
    the installed GDT frames as Xen's copy to the guest does (they are mapped read-only)."""

    __slots__ = ("read_only",)

    def __init__(self, *args, read_only: tuple[int, ...] = ()):
        super().__init__(*args)
        self.read_only = read_only

    def write(self, linear: int, data: bytes, fault: tuple[int, int] = (GP, 0)) -> None:
        physical = self.physical(linear, len(data), True)
        first, last = physical >> 12, (physical + len(data) - 1) >> 12
        if data and any(first <= frame <= last for frame in self.read_only):
            raise ReadOnlyFrame(fault[0], fault[1], f"write at {linear:#x} into an installed (read-only) GDT frame")
        super().write(linear, data, fault)


@dataclass(slots=True)
class PvCpu(VCpu):
    """The virtual CPU of a PV guest: the VCpu's delivery (``interrupts.deliver``) with the trap table as
    its gates, evtchn_upcall_mask as its IF and the stack_switch stack as its ring-1 stack."""

    memory: Any = None
    shared: int = 0                                 # shared_info's address
    real_gdt: int = 0                               # the monitor's GDT (the guest's entries + Xen's)
    traps: dict[int, tuple[int, int, int]] = field(default_factory=dict)    # vector -> (flags, cs, address)
    kernel_stack: tuple[int, int] = (0, 0)          # (ss, esp) from stack_switch
    callback: tuple[int, int] = (0, 0)              # the event callback (selector, address)
    gdt_frames: tuple[int, ...] = ()                # the installed GDT's frames (read-only to the guest)

    @classmethod
    def from_machine(cls, machine: Machine, ring: int) -> PvCpu:
        v = VCpu.from_machine.__func__(cls, machine, ring)
        v.memory, v.shared = machine.memory, machine.memory.ram_size - X.SHARED_INFO_FROM_TOP
        return v

    # --- evtchn_upcall_mask, the virtual IF ----------------------------------------------------------
    def masked(self) -> bool:
        return bool(self.memory.u8(self.shared + X.VCPU_MASK))

    def set_mask(self, masked: bool) -> None:
        self.memory.write(self.shared + X.VCPU_MASK, b"\x01" if masked else b"\x00")

    def eflags(self, real: int) -> int:
        """The EFLAGS of a bounce frame: IF = not evtchn_upcall_mask (Xen's create_bounce_frame)."""
        return (real & ~(IF | IOPL)) | (0 if self.masked() else IF)

    def set_eflags(self, virtual: int) -> int:
        self.set_mask(not virtual & IF)
        return (virtual & ~IOPL) | IF

    # --- what the guest sees ---------------------------------------------------------------------------
    def space(self, machine: Machine, mark: bool = True) -> AddressSpace:
        """Selectors resolve in the real GDT: the guest's validated entries and Xen's flat ones."""
        return PvSpace(machine.memory, self.cr0, self.cr3, self.cr4, (self.real_gdt, TABLE_SIZE - 1),
                       self.ldtr[1:], mark, read_only=self.gdt_frames)

    def state(self, machine: Machine) -> dict:
        s = VCpu.state(self, machine)               # (slots dataclass: no zero-argument super)
        s["eflags"] = machine.reg("eflags")          # what pushf shows: the real IF = 1, IOPL 0
        return s

    def io_permitted(self, machine: Machine, port: int, size: int) -> bool:
        """Granted ports from the kernel (ring 1); nothing from ring 3 (IOPL 0, no physdev_op)."""
        return machine.cpl() == X.KERNEL_RING and all(p in X.GRANTED_PORTS for p in range(port, port + size))

    def fault_address(self, machine: Machine, address: int) -> None:
        self.cr2 = address
        self.memory.write(self.shared + X.VCPU_CR2, struct.pack("<I", address & 0xFFFFFFFF))

    def enter_handler(self, m: Machine, event: Interrupt, depth: int) -> None:
        try:
            VCpu.enter_handler(self, m, event, depth)
        except ReadOnlyFrame as fault:
            raise BounceFailed(f"the bounce frame for {event.name} at {event.insn:#x}: {fault.why}") from None

    def tss_stack(self, space: AddressSpace, cpl: int, ext: int) -> tuple[int, int]:
        ss, esp = self.kernel_stack
        if cpl != X.KERNEL_RING or ss & 0xFFFC == 0:
            raise GuestFault(TS, ext, "no kernel stack (stack_switch) for a transition from ring 3")
        return ss, esp

    def gate(self, space: AddressSpace, event: Interrupt) -> tuple[Descriptor, Descriptor, int]:
        """The trap-table entry (or the event callback) as the gate a delivery goes through; no entry is a
        domain crash, not a fault."""
        ext = 0 if event.source == SOFTWARE else 1
        if event.vector == UPCALL:
            (selector, address), flags = self.callback, X.TI_MASK_EVENTS
        else:
            entry = self.traps.get(event.vector)
            if entry is None:
                raise Crash(event)
            flags, selector, address = entry
        dpl = flags & X.TI_DPL
        if event.source == SOFTWARE and dpl < self.cpl:
            raise GuestFault(GP, event.vector * 8 + 2, f"{event.name} at ring {self.cpl}, trap-table DPL {dpl}")
        kind = INTERRUPT_GATE if flags & X.TI_MASK_EVENTS else TRAP_GATE
        gate = Descriptor.from_bytes(struct.pack("<HHHH", address & 0xFFFF, selector,
                                                 0x8000 | dpl << 13 | kind << 8, address >> 16))
        code_error = (selector & 0xFFFC) + ext
        code = space.descriptor(selector, GP, code_error)
        if not code.is_code or code.dpl > self.cpl:
            raise GuestFault(GP, code_error, f"trap-table selector {selector:#x} is not code at DPL <= {self.cpl}")
        if not code.present:
            raise GuestFault(NP, code_error, f"code segment {selector:#x} not present")
        return gate, code, ext


class ParaVirtual(Deprivileged):
    """Xen's 32-bit PV ABI (module docstring)."""

    name = "pv"
    ring = X.KERNEL_RING
    source_defines = {"PV": 1}                          # its guests are the -D PV builds (platform.inc)
    vcpu_type = PvCpu

    # The hypercall table: number -> handler (each takes the five argument registers).
    HYPERCALLS = {
        0: "set_trap_table", 2: "set_gdt", 3: "stack_switch", 4: "set_callbacks", 10: "update_descriptor",
        13: "multicall", 15: "set_timer_op", 17: "xen_version", 18: "console_io", 29: "sched_op",
        32: "event_channel_op",
    }
    SCHED_OPS = {X.SCHEDOP_YIELD: "_yield", X.SCHEDOP_BLOCK: "_block", X.SCHEDOP_SHUTDOWN: "_shutdown"}
    EVTCHN_OPS = {X.EVTCHNOP_BIND_VIRQ: "_bind_virq", X.EVTCHNOP_SEND: "_send", X.EVTCHNOP_UNMASK: "_unmask"}

    def __init__(self, cmdline: str = ""):
        self.cmdline = cmdline.encode()
        if len(self.cmdline) > X.CMD_LINE_SIZE - 1:     # start_info's cmd_line[1024] ends with a NUL
            raise UsageError(f"--cmdline is {len(self.cmdline)} bytes; start_info holds at most "
                             f"{X.CMD_LINE_SIZE - 1}")

    # --- boot --------------------------------------------------------------------------------------------
    def attach(self, machine: Machine) -> None:
        memory = machine.memory
        top = memory.ram_size
        self.start_info, self.shared = top - X.START_INFO_FROM_TOP, top - X.SHARED_INFO_FROM_TOP
        memory.write(self.start_info, X.start_info(top, self.cmdline))
        memory.write(self.shared, X.shared_info())
        self._calls = machine.events.counter("hypercall")
        self._multicalls = machine.events.counter("multicall")
        self._traps = machine.events.counter("trap")
        self.recipes = Recipes()
        self._rep: tuple[int, int] | None = None        # the string I/O instruction in progress
        self.timer: int | None = None                   # the one-shot timer's deadline (system time)
        self.virqs: dict[int, int] = {}                 # VIRQ -> bound port
        self._in_multicall = False
        super().attach(machine)
        v = self.vcpu
        v.real_gdt = self.shadow.gdt
        v.gdtr, v.idtr, v.cpl = (0, 0), (0, 0), X.KERNEL_RING
        self.shadow.trace_gdt = False                   # the guest's GDT frames are read-only instead
        self.shadow.gdt_changed()                       # no guest descriptors yet: Xen's flat ones only
        self.followed("gdtr")
        machine.enter(cs=X.FLAT_RING1_CS, eip=machine.reg("eip"), esp=X.BOOT_ESP, eflags=X.BOOT_EFLAGS,
                      cpl=X.KERNEL_RING, ss=X.FLAT_RING1_DS)
        for sreg in ("ds", "es", "fs", "gs"):
            machine.set_reg(sreg, X.FLAT_RING1_DS)
        machine.set_reg("esi", self.start_info)
        v.set_mask(True)
        self._refresh_time(machine)

    def followed(self, what: str) -> None:
        if what == "gdtr":                              # the rebuilt real GDT gets Xen's entries back
            for selector, raw in X.RESERVED.items():
                self.m.memory.monitor_write(self.shadow.gdt + (selector & 0xFFF8), raw)

    def io_allowed(self, machine: Machine, port: int, size: int) -> bool:
        """A granted port from the kernel traps into the hypervisor and is emulated (counted as a trap by
        the instruction's name); anything else is the #GP the hardware gives."""
        if not self.vcpu.io_permitted(machine, port, size):
            return False
        eip, now = machine.reg("eip"), machine.total_instructions()
        try:
            recipe = self.recipes.get(machine, self.vcpu, eip)
        except GuestFault:
            recipe = None
        repeating = recipe is not None and recipe.rep and self._rep == (eip, now - 1)
        self._rep = (eip, now)
        if not repeating:                               # a rep ins/outs is one trap, emulated whole
            self._traps[recipe.name if recipe is not None and recipe.name in PORT_IO else "in"] += 1
        return True

    def routing(self):
        return {(SOFTWARE, X.HYPERCALL_VECTOR): self._hypercall, (EXCEPTION, UD): self._undefined,
                (EXCEPTION, PF): self.hidden_page_fault}

    def _undefined(self, machine: Machine, event: Interrupt) -> bool:
        """rdpmc is #UD on this machine at every CPL; the guest never runs at CPL 0 and CR4.PCE is 0, so the
        SDM's answer is #GP(0)."""
        try:
            recipe = self.recipes.get(machine, self.vcpu, event.insn)
        except GuestFault:
            return False
        if recipe is None or recipe.name != "rdpmc":
            return False
        self.reflect(machine, GuestFault(GP, 0, "rdpmc at CPL > 0 with CR4.PCE = 0").event(event.insn))
        return True

    # --- events from the machine ------------------------------------------------------------------------
    def intercept(self, machine: Machine, event: Interrupt) -> bool:
        self.sync_cpl(machine)
        return super().intercept(machine, event)

    def reflect(self, machine: Machine, event: Interrupt) -> None:
        """Deliver through the trap table: a direct trap (no hypervisor work), or a bounce by the hypervisor;
        an event with no entry crashes the domain."""
        entry = self.vcpu.traps.get(event.vector)
        if entry is None:                               # never reaches the guest: nothing is counted for it
            self.crash(machine, self._no_entry(machine, event, event))
            return
        direct = (event.source == SOFTWARE and self.vcpu.cpl == 3 and entry is not None
                  and entry[0] & X.TI_DPL == 3 and not entry[0] & X.TI_MASK_EVENTS)
        machine.events.count("direct-trap" if direct else REFLECT, event.name)
        try:
            interrupts.deliver(machine, self.vcpu, event)
        except BounceFailed as failed:
            self.crash(machine, str(failed))
            return
        except Crash as crash:
            self.crash(machine, self._no_entry(machine, crash.args[0], event))
            return
        if machine.end is not None and machine.end.reason == TRIPLE_FAULT:
            # Xen has no triple fault for a PV guest: a bounce it cannot complete crashes the domain.
            why = machine.end.why
            machine.end = None
            self.crash(machine, f"the trap table cannot take {event.name} at {event.insn:#x}: {why}")

    def crash(self, machine: Machine, why: str) -> None:
        machine.events.count("crash", "domain")
        machine.finish(CRASH, None, why)

    def _no_entry(self, machine: Machine, missing: Interrupt, original: Interrupt) -> str:
        """What the crash says: the event with no trap-table entry, where, the instruction and, for a
        privileged one, what a PV kernel does instead."""
        where = original.insn
        try:
            recipe = decode(machine.memory.read(where, 15), where)
        except GuestFault:
            recipe = None
        if recipe is None:
            insn = decode_at(machine.memory.read(where, 15), 0, where, 32) if machine.memory.in_ram(where, 15) \
                else None
            text = insn.text if insn is not None else "an undecodable instruction"
        elif recipe.name in PORT_IO:
            text = f"{recipe.name} {self._port(machine, recipe):#x}"
        else:
            text = recipe.text
        if original.vector == GP and original.source == EXCEPTION and recipe is not None \
                and recipe.name in INSTEAD and missing is original:
            name = text if recipe.name in PORT_IO else recipe.name
            return (f"{name} at {where:#x}: {INSTEAD[recipe.name]} ({recipe.text}: #GP at ring {self.vcpu.cpl}, "
                    f"no trap-table entry)")
        during = "" if missing is original else f" while delivering {original.name}"
        return (f"{missing.name}{during} at {where:#x} ({text}): no trap-table entry for vector "
                f"{missing.vector:#x}")

    @staticmethod
    def _port(machine: Machine, recipe) -> int:
        for op in recipe.operands:
            if op.kind == "imm":
                return op.number & 0xFFFF
        return machine.reg("edx") & 0xFFFF

    # --- hypercalls ---------------------------------------------------------------------------------------
    def _hypercall(self, machine: Machine, event: Interrupt) -> bool:
        if self.vcpu.cpl != X.KERNEL_RING:               # Xen's int 0x82 gate has DPL 1
            self.reflect(machine, GuestFault(GP, X.HYPERCALL_VECTOR * 8 + 2, "int 0x82 from ring 3")
                         .event(event.insn))
            return True
        r = machine.registers(("eax", "ebx", "ecx", "edx", "esi", "edi"))
        machine.set_reg("eip", event.eip)
        try:
            result = self.call(r["eax"], (r["ebx"], r["ecx"], r["edx"], r["esi"], r["edi"]), self._calls)
        except Continuation as more:                    # the same hypercall again, on the rest of its work
            for register, value in more.registers.items():
                machine.set_reg(register, value & 0xFFFFFFFF)
            machine.set_reg("eip", event.insn)
            self.take_interrupt(machine)                # a preemption point: pending events come first
            return True
        if machine.end is None:
            machine.set_reg("eax", result & 0xFFFFFFFF)
            self._refresh_time(machine)
            if not machine.halted:
                self.take_interrupt(machine)            # pending events are delivered on return
        return True

    def call(self, number: int, args: tuple[int, ...], counter) -> int:
        """One hypercall by number (also for multicall entries); the result, negative errno on failure."""
        handler = self.HYPERCALLS.get(number)
        counter[X.HYPERCALL_NAMES.get(number, "unknown")] += 1
        if handler is None:
            return -X.ENOSYS
        try:
            return getattr(self, f"hc_{handler}")(*args)
        except Errno as error:
            return -error.errno

    def _read(self, address: int, size: int) -> bytes:
        if not self.m.memory.in_ram(address, size):
            raise Errno(X.EFAULT)
        return self.m.memory.read(address, size)

    def _write(self, address: int, data: bytes) -> None:
        """A hypercall's write-back: through the guest's space (no paging: linear = physical), so an
        installed GDT frame or an address outside RAM is -EFAULT (Xen's copy_to_guest)."""
        try:
            self.vcpu.space(self.m).write(address, data)
        except GuestFault:
            raise Errno(X.EFAULT) from None

    def _u32(self, address: int) -> int:
        return struct.unpack("<I", self._read(address, 4))[0]

    @staticmethod
    def _kernel_selector(selector: int) -> int:
        """Xen's fixup_guest_code_selector / stack selector: RPL 0 is taken as the kernel's RPL 1."""
        selector &= 0xFFFF
        return selector | X.KERNEL_RING if selector & 3 == 0 else selector

    @staticmethod
    def _gate_selector_ok(selector: int) -> bool:
        """Xen's guest_gate_selector_okay: the flat kernel CS, or one of the guest's own (validated) selectors."""
        return (selector & 0xFFFC == X.FLAT_RING1_CS & 0xFFFC or bool(selector & 4)
                or selector >> 3 < X.FIRST_RESERVED_GDT_ENTRY)

    def hc_set_trap_table(self, table: int, *_) -> int:
        traps = self.vcpu.traps
        if table == 0:
            traps.clear()
            return 0
        for i in range(MAX_TRAP_ENTRIES + 1):
            vector, flags, cs, address = X.TRAP_INFO.unpack(self._read(table + 8 * i, 8))
            if address == 0:
                return 0
            cs = self._kernel_selector(cs)
            if not self._gate_selector_ok(cs):
                return -X.EPERM
            traps[vector] = (flags, cs, address)
        return -X.EINVAL

    def hc_set_gdt(self, frame_list: int, entries: int, *_) -> int:
        if entries > X.FIRST_RESERVED_GDT_ENTRY:
            return -X.EINVAL
        count = (entries + 511) // 512
        frames = struct.unpack(f"<{count}I", self._read(frame_list, 4 * count))
        pages = self.start_info // 4096                 # start_info and shared_info stay writable
        if any(f >= pages for f in frames) or any(b != a + 1 for a, b in zip(frames, frames[1:])):
            return -X.EINVAL
        base = frames[0] * 4096 if frames else 0
        raw = self.m.memory.read(base, entries * 8) if entries else b""
        table = [raw[i:i + 8] for i in range(0, len(raw), 8)]

        def own_code(selector: int) -> bool:
            index = selector >> 3
            return not selector & 4 and index < len(table) and _kernel_code(table[index])

        if any(X.descriptor_ok(d, own_code) for d in table):
            return -X.EINVAL
        self._protect(self.vcpu.gdt_frames, unicorn.UC_PROT_ALL)
        self.vcpu.gdt_frames = frames
        self.vcpu.gdtr = (base, entries * 8 - 1) if entries else (0, 0)
        self.vcpu.changed("gdtr")
        self._protect(frames, unicorn.UC_PROT_READ | unicorn.UC_PROT_EXEC)
        return 0

    def _protect(self, frames: tuple[int, ...], perms: int) -> None:
        for frame in frames:
            self.m.uc.mem_protect(frame * 4096, 4096, perms)

    def hc_update_descriptor(self, ma_lo: int, ma_hi: int, lo: int, hi: int, *_) -> int:
        address = ma_lo
        if ma_hi or address & 7 or not self.m.memory.in_ram(address, 8):
            return -X.EINVAL
        raw = struct.pack("<II", lo, hi)
        base, limit = self.vcpu.gdtr
        in_gdt = self.vcpu.gdt_frames and base <= address and address + 7 <= base + limit

        def own_code(selector: int) -> bool:
            at = base + (selector & 0xFFF8)
            return (bool(in_gdt) and not selector & 4 and at + 7 <= base + limit
                    and _kernel_code(raw if at == address else self.m.memory.read(at, 8)))

        if X.descriptor_ok(raw, own_code):
            return -X.EINVAL
        self.m.memory.write(address, raw)
        if in_gdt:
            self.m.memory.monitor_write(self.shadow.gdt + address - base, compress(raw, X.KERNEL_RING))
            self.vcpu.changed("descriptors")
        return 0

    def hc_stack_switch(self, ss: int, esp: int, *_) -> int:
        ss = self._kernel_selector(ss)
        if ss & 3 != X.KERNEL_RING:
            return -X.EINVAL
        self.vcpu.kernel_stack = (ss, esp)
        # Xen's tss.ss1/esp1: a call gate from ring 3 into ring 1 switches to it on the real CPU too.
        self.m.memory.monitor_write(self.shadow.tss + 4 + 8 * X.KERNEL_RING, struct.pack("<II", esp, ss))
        return 0

    def hc_set_callbacks(self, event_sel: int, event_addr: int, failsafe_sel: int, failsafe_addr: int, *_) -> int:
        event_sel, failsafe_sel = self._kernel_selector(event_sel), self._kernel_selector(failsafe_sel)
        if not (self._gate_selector_ok(event_sel) and self._gate_selector_ok(failsafe_sel)):
            return -X.EPERM
        self.vcpu.callback = (event_sel, event_addr)
        self.failsafe = (failsafe_sel, failsafe_addr)
        return 0

    def hc_multicall(self, calls: int, count: int, *_) -> int:
        """The entries in order, results written back; the whole array must be in guest RAM (Xen's
        copy_from_guest of it: -EFAULT, nothing run). After ``MULTICALL_BATCH`` entries the hypercall is
        continued (docs/pv.md): each batch is one ``int 0x82`` the run counts, so no single instruction
        runs more than a batch."""
        size = X.MULTICALL_ENTRY.size
        if self._in_multicall:
            return -X.EINVAL
        if not self.m.memory.in_ram(calls, count * size):
            return -X.EFAULT
        self._in_multicall = True
        try:
            for i in range(min(count, MULTICALL_BATCH)):
                entry = calls + i * size
                op, _result, *args = X.MULTICALL_ENTRY.unpack(self._read(entry, size))
                result = self.call(op, tuple(args[:5]), self._multicalls)
                self._write(entry + 4, struct.pack("<I", result & 0xFFFFFFFF))
                if self.m.end is not None:
                    return 0
        except Errno as error:
            return -error.errno
        finally:
            self._in_multicall = False
        if count > MULTICALL_BATCH:
            raise Continuation(ebx=calls + MULTICALL_BATCH * size, ecx=count - MULTICALL_BATCH)
        return 0

    def hc_set_timer_op(self, lo: int, hi: int, *_) -> int:
        deadline = hi << 32 | lo
        self.timer = deadline or None
        self.m.devices_changed = True                   # the run loop plans its chunks again
        self.m.stop_chunk()
        if deadline and deadline <= self.m.now():
            self.advance(self.m)                        # a deadline in the past fires at once
        return 0

    def hc_xen_version(self, cmd: int, *_) -> int:
        return X.XENVER_VERSION if cmd == 0 else -X.ENOSYS

    def hc_console_io(self, cmd: int, count: int, buffer: int, *_) -> int:
        if cmd == X.CONSOLEIO_READ:
            return 0
        if cmd != X.CONSOLEIO_WRITE:
            return -X.ENOSYS
        if count == 0:                                  # Xen copies nothing: no pointer to check
            return 0
        self.m.serial.emit(self._read(buffer, count))
        return count

    def hc_sched_op(self, cmd: int, arg: int, *_) -> int:
        handler = self.SCHED_OPS.get(cmd)
        return -X.ENOSYS if handler is None else getattr(self, handler)(arg)

    def _yield(self, _arg: int) -> int:
        return 0

    def _block(self, _arg: int) -> int:
        """Unmask events and wait for the next one, unless one is pending already."""
        self.vcpu.set_mask(False)
        if not self.interrupt_pending(self.m):
            self.m.halt()
        return 0

    def _shutdown(self, arg: int) -> int:
        reason = self._u32(arg) & 0xFF                  # Xen: domain_shutdown(d, (u8)reason), never -EINVAL
        self.m.finish(SHUTDOWN, reason, f"sched_op shutdown, reason {reason}")
        return 0

    def hc_event_channel_op(self, cmd: int, arg: int, *_) -> int:
        handler = self.EVTCHN_OPS.get(cmd)
        return -X.ENOSYS if handler is None else getattr(self, handler)(arg)

    def _bind_virq(self, arg: int) -> int:
        virq, vcpu = struct.unpack("<II", self._read(arg, 8))
        if virq != X.VIRQ_TIMER:
            return -X.EINVAL
        if vcpu != 0:
            return -X.ENOENT
        if virq in self.virqs:
            return -X.EEXIST
        port = next(p for p in range(1, X.NR_PORTS) if p not in self.virqs.values())
        self.virqs[virq] = port                         # bound even if the write-back fails, as in Xen
        self._write(arg + 8, struct.pack("<I", port))
        return 0

    def _bound_port(self, arg: int) -> int:
        port = self._u32(arg)
        if port not in self.virqs.values():
            raise Errno(X.EINVAL)
        return port

    def _send(self, arg: int) -> int:
        self._set_pending(self._bound_port(arg))
        return 0

    def _unmask(self, arg: int) -> int:
        port = self._bound_port(arg)
        self._set_bit(X.EVTCHN_MASK, port, False)
        if self._bit(X.EVTCHN_PENDING, port):
            self._notify(port)
        return 0

    # --- event channels ------------------------------------------------------------------------------------
    def _bit(self, table: int, port: int) -> bool:
        return bool(self.m.memory.u32(self.shared + table + 4 * (port // 32)) >> (port % 32) & 1)

    def _set_bit(self, table: int, port: int, value: bool) -> None:
        at = self.shared + table + 4 * (port // 32)
        word = self.m.memory.u32(at)
        word = word | 1 << port % 32 if value else word & ~(1 << port % 32)
        self.m.memory.write(at, struct.pack("<I", word & 0xFFFFFFFF))

    def _set_pending(self, port: int) -> None:
        """Xen's evtchn_set_pending: the port's bit; if it was clear and the port is unmasked, its selector
        bit and evtchn_upcall_pending."""
        if self._bit(X.EVTCHN_PENDING, port):
            return
        self._set_bit(X.EVTCHN_PENDING, port, True)
        if not self._bit(X.EVTCHN_MASK, port):
            self._notify(port)

    def _notify(self, port: int) -> None:
        memory = self.m.memory
        selector = self.shared + X.VCPU_PENDING_SEL
        memory.write(selector, struct.pack("<I", memory.u32(selector) | 1 << port // 32))
        memory.write(self.shared + X.VCPU_PENDING, b"\x01")

    def _refresh_time(self, machine: Machine) -> None:
        """vcpu_time_info: system time (ns) = the machine's clock (docs/pv.md)."""
        now = machine.now()
        version = machine.memory.u32(self.shared + X.TIME_VERSION)
        machine.memory.write(self.shared + X.TIME_VERSION, struct.pack("<IIQQ", (version + 2) & 0xFFFFFFFE, 0,
                                                                        now, now))

    # --- the platform hooks: the one-shot timer and upcalls ------------------------------------------------
    def next_event(self, machine: Machine) -> int | None:
        return self.timer

    def advance(self, machine: Machine) -> int:
        if self.timer is None or machine.now() < self.timer:
            return 0
        self.timer = None
        port = self.virqs.get(X.VIRQ_TIMER)
        if port is not None:
            self._set_pending(port)
        return 1

    def interrupt_pending(self, machine: Machine) -> bool:
        return bool(machine.memory.u8(self.shared + X.VCPU_PENDING))

    def interrupts_enabled(self, machine: Machine) -> bool:
        return not self.vcpu.masked()

    def can_wake(self, machine: Machine) -> bool:
        port = self.virqs.get(X.VIRQ_TIMER)
        return self.timer is not None and port is not None and not self._bit(X.EVTCHN_MASK, port)

    def take_interrupt(self, machine: Machine) -> bool:
        """An upcall, if one is pending and events are not masked: an interrupt-style frame at the event
        callback, events masked."""
        v = self.vcpu
        if machine.end is not None or not self.interrupt_pending(machine) or v.masked():
            return False
        machine.halted = False
        if v.callback[1] == 0:
            self.crash(machine, "an event is due and no event callback is set (set_callbacks)")
            return True
        self.sync_cpl(machine)
        self._refresh_time(machine)
        machine.events.count("upcall", "event")
        eip = machine.reg("eip")
        try:
            v.enter_handler(machine, Interrupt(UPCALL, EXTERNAL, None, eip=eip, insn=eip, why="upcall"), 0)
        except (GuestFault, BounceFailed) as fault:
            self.crash(machine, f"the upcall frame could not be written at {eip:#x}: {fault}")
        return True

    def state(self, machine: Machine) -> dict:
        self.sync_cpl(machine)
        return super().state(machine)
