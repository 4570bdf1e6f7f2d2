"""``sun4v``: the UltraSPARC T1/T2 hyperprivileged model on popek's x86 machine (docs/sun4v.md is the
guest's contract).

Three levels: user (CPL 3), privileged (the guest kernel at CPL 0) and hyperprivileged (this monitor). The
guest kernel runs at its own ring 0 on its own GDT, IDT, LDT, TSS, control registers, paging, IF and
IOPL: the real machine *is* the guest's, as on a dedicated strand. cli/sti, pushf/popf, the table loads,
hlt, and the strand-local timer and interrupt controller (the PIT and PIC ports) run with no hypervisor
entry at all. Only the platform is the hypervisor's:

- Hypervisor calls: ``int n`` with n >= 0x80 at CPL 0 (``ta n`` in privileged mode) reach ``intercept``
  as a software interrupt before the guest's IDT: 0x80 is the fast trap (function in EBP = %o5, the table
  ``fast_traps``), 0x83/0x84 are mmu_map_addr/mmu_unmap_addr (ENOTSUPPORTED: the guest's own page tables
  translate), any other is EBADTRAP. From CPL 3 an ``int n`` goes through the guest's IDT as any other.
- Hyperprivileged traps: what the ISA description's ``model sun4v`` lists as trapping (what traps is data).
  Those that run at CPL 0 on this machine (port I/O beyond the strand's ports, rdmsr, wrmsr, wbinvd,
  invd, wbnoinvd; sysenter at any CPL) are found by a ``popek.machine.watch.Watch``; the hook decides from the operands
  (the port) and stops the chunk before the instruction with #GP(0), which goes through the guest's own
  IDT. Those that are #UD on this machine (swapgs, rsm, the VMX/SVM instructions, syscall outside 64-bit mode) are seen at
  their #UD, which the guest then gets as natively. An access beyond the domain's real addresses (its
  RAM) is the bare machine's #GP(0), counted as a hyperprivileged trap on ``memory``. The guest kernel's
  own protection comes first: a port access its IOPL and I/O bitmap refuse at CPL 3, or a privileged
  instruction at CPL 3, is its own #GP and no hypervisor work.
- An unported guest (one that prints with ``out`` to COM1) faults there; the run's end says which
  instruction was the first hyperprivileged trap and what a sun4v kernel calls instead.

Counted: ``hypercall`` by function name (``bad-trap`` for EBADTRAP), ``hypertrap`` by instruction (and
``memory``), ``idle`` clocks skipped in cpu_yield, and ``sun4v`` (the watch's bookkeeping). Nothing else:
the guest's own exceptions, interrupts and system calls are counted by the machine as natively.

Domains (``popek.monitors.sun4v.domains``): one ``Sun4v`` per domain, each on its own machine (its memory
is the machine's RAM: no domain can address another's), with the channel endpoints its configuration
gives it. cpu_yield waiting for a channel entry halts the machine and ``waits_outside`` tells the run
loop to let the other domains run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from popek.isa.language import bundled
from popek.machine import ioperm
from popek.machine.faults import EXCEPTION, GP, SOFTWARE, UD, GuestFault, Interrupt
from popek.machine.result import HLT, MACH_EXIT, Exit
from popek.machine.watch import Watch
from popek.monitors.base import MonitorOps
from popek.monitors.emulation.recipe import Recipe, decode, port_access
from popek.monitors.sun4v import api as A
from popek.monitors.sun4v.channels import Endpoint, Queue

if TYPE_CHECKING:
    from popek.machine.machine import Machine

IOPL_SHIFT = 12
# Instructions of the model's trap lines that are #UD on this machine: the hypervisor sees them at the #UD.
AT_UD = frozenset({"swapgs", "rsm", "vmx", "vmcall", "svm", "vmmcall", "syscall"})   # (syscall: 32-bit mode)
# Hyperprivileged at every CPL: system-call instructions that enter code the (hyperprivileged) MSRs name.
MSR_ENTRIES = frozenset({"sysenter"})


class Status(Exception):
    """A hypervisor call fails with a status code (``api.E*``)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _check(ok: bool, status: int) -> None:
    if not ok:
        raise Status(status)


class Sun4v(MonitorOps):
    """One logical domain on its dedicated strand (module docstring)."""

    name = "sun4v"
    source_defines = {"SUN4V": 1}                   # its guests are the -D SUN4V builds (platform.inc)
    note = ("sun4v is a model: UltraSPARC T1/T2's three privilege levels and hypervisor API applied to popek's "
            "x86 machine (Unicorn cannot run privileged SPARC code)")

    def __init__(self, domain: str = "primary", endpoints: dict[int, Endpoint] | None = None):
        """``endpoints``: channel number -> this domain's end of a channel (none in a single-domain run)."""
        self.domain = domain
        self.endpoints = dict(endpoints or {})
        isa = bundled()
        self.traps = frozenset(isa.model("sun4v").traps) & set(isa.instructions)
        self.fast_traps: dict[int, Callable[..., tuple[int, ...] | None]] = {
            number: getattr(self, f"hv_{name}") for number, name in A.FUNCTIONS.items()}

    # --- set-up ----------------------------------------------------------------------------------------------
    def attach(self, machine: Machine) -> None:
        self.m = machine
        self._calls = machine.events.counter("hypercall")
        self._hypertraps = machine.events.counter("hypertrap")
        self._recipes: dict[tuple[int, bytes], Recipe | None] = {}
        self.first_trap: str | None = None          # the first hyperprivileged trap, for the end of the run
        self.yielding = False                       # in cpu_yield, waiting for a channel entry
        self._states: tuple = ()                    # the channels as cpu_yield found them
        self.running = True
        for end in self.endpoints.values():
            end.owner = self
        self.watch = Watch(machine, self.traps - AT_UD, self._on_insn, kind="sun4v")

    # --- hyperprivileged traps ---------------------------------------------------------------------------------
    def _on_insn(self, address: int, name: str) -> None:
        m = self.m
        if m.event_pending:
            return
        eip = m.reg("eip")
        raw = self.watch.decoder.raw.get(address)
        recipe = self._recipes.get((eip, raw))
        if recipe is None:
            recipe = self._recipes[(eip, raw)] = decode(raw, eip) if raw else None
        if recipe is None or recipe.name != name:
            return
        found = self._hyperprivileged(m, recipe)
        if found is not None:
            what, instead = found
            self._hypertrap(name, f"{what} at {eip:#x}: {instead}")
            m.stop_chunk(Interrupt(GP, EXCEPTION, 0, eip=eip, insn=eip, why=f"{what}: hyperprivileged"))

    def _hyperprivileged(self, m: Machine, r: Recipe) -> tuple[str, str] | None:
        """(what, what a sun4v kernel does instead) when this execution of ``r`` touches hyperprivileged
        state; None when it is the guest's own business (its strand's ports; its own #GP at CPL 3)."""
        cpl = m.reg("cs") & 3
        if r.name in A.PORT_IO:
            port, size, _inbound = port_access(r, m.reg("edx"))
            ports = range(port, port + size)
            if all(p in A.STRAND_PORTS for p in ports):
                return None
            iopl = (m.reg("eflags") >> IOPL_SHIFT) & 3
            if cpl > iopl and not ioperm.bitmap_allows(m.address_space(), m.table("tr"), port, size):
                return None                         # the kernel's own I/O protection refuses it first
            return f"{r.name} {port:#x}", A.port_instead(ports)
        if cpl and r.name not in MSR_ENTRIES:
            return None                             # privileged: the hardware's #GP at CPL 3
        return r.text, A.INSTEAD.get(r.name, "hyperprivileged state")

    def _hypertrap(self, name: str, note: str) -> None:
        self._hypertraps[name] += 1
        if self.first_trap is None:
            self.first_trap = note

    def intercept(self, machine: Machine, event: Interrupt) -> bool:
        if event.source == SOFTWARE and event.vector >= A.HYPERVISOR_TRAPS and event.name.startswith("int ") \
                and machine.cpl() == 0:
            self._hypervisor_trap(machine, event)
            return True
        if event.source == EXCEPTION and event.vector == GP and event.why.endswith("memory)"):
            self._hypertrap(A.MEMORY, f"{event.why} at {event.eip:#x}: {A.INSTEAD[A.MEMORY]}")
        elif event.source == EXCEPTION and event.vector == UD:
            self._undefined(machine, event)
        return False                                # the guest's own IDT, as on the bare machine

    def _undefined(self, m: Machine, event: Interrupt) -> None:
        try:
            r = decode(m.read_linear(event.eip, 15), event.eip)
        except GuestFault:
            return
        if r is not None and r.name in AT_UD & self.traps:
            self._hypertrap(r.name, f"{r.text} at {event.eip:#x}: hyperprivileged (#UD)")

    def detach(self, machine: Machine) -> None:
        self.running = False                        # its channels go down: a peer waiting on one wakes
        end = machine.end
        if self.first_trap is not None and end.reason != MACH_EXIT:
            note = f"first hyperprivileged trap: {self.first_trap}"
            machine.end = Exit(end.reason, end.code, f"{end.why}; {note}" if end.why else note)

    # --- hypervisor calls ----------------------------------------------------------------------------------
    def _hypervisor_trap(self, m: Machine, event: Interrupt) -> None:
        o = m.registers(A.O_REGS)
        m.set_reg("eip", event.eip)                 # continue after the int, as after ta's done/retry
        if event.vector == A.FAST_TRAP:
            handler = self.fast_traps.get(o["ebp"])
            name = A.FUNCTIONS.get(o["ebp"], A.BAD_TRAP)
        else:
            handler, name = None, A.HYPER_FAST.get(event.vector, A.BAD_TRAP)
        self._calls[name] += 1
        if handler is None:
            results: tuple[int, ...] | None = (A.ENOTSUPPORTED if event.vector in A.HYPER_FAST else A.EBADTRAP,)
        else:
            try:
                results = handler(*(o[r] for r in A.O_REGS[:5]))
            except Status as status:
                results = (status.code,)
        if results is None or m.end is not None:
            return                                  # mach_exit, or the run ended in the call
        for register, value in zip(A.O_REGS, results):
            m.set_reg(register, value & 0xFFFFFFFF)

    def _ra(self, ra: int, size: int) -> None:
        """A buffer or queue must lie in the domain's real addresses (0 .. its memory size)."""
        _check(self.m.memory.in_ram(ra, size), A.ENORADDR)

    def hv_mach_exit(self, code: int, *_) -> None:
        self.m.finish(MACH_EXIT, code & 0xFF, f"mach_exit({code & 0xFF})")
        return None

    def hv_mach_desc(self, ra: int, length: int, *_) -> tuple[int, ...]:
        text = self.description().encode()
        if length < len(text):
            return A.EINVAL, len(text)
        self._ra(ra, len(text))
        self.m.memory.write(ra, text)
        return A.EOK, len(text)

    def description(self) -> str:
        """mach_desc's text: the domain's name, vCPUs, memory and channels, one per line."""
        lines = [f"domain {self.domain}", "vcpus 1", f"memory {self.m.memory.ram_size:#x}"]
        lines += [f"channel {n} {e.channel.name} to {e.peer.domain}" for n, e in sorted(self.endpoints.items())]
        return "\n".join(lines) + "\n"

    def hv_cpu_yield(self, *_) -> tuple[int, ...] | None:
        m = self.m
        if self._woken():
            return (A.EOK,)
        event = self.next_event(m)
        if event is not None and self.can_wake(m):
            now = m.now()
            if event > now:
                m.events.count("idle", "clocks", event - now)
                m.time += event - now               # the strand sleeps until its timer fires
            self.advance(m)
            m.devices_changed = True                # the run loop looks at the interrupt line now
            m.stop_chunk()
            return (A.EOK,)
        if any(e.peer.owner is not None and e.peer.owner.running for e in self.endpoints.values()):
            self.yielding = True                    # until an entry arrives or a channel changes state
            self._states = self._channel_states()
            m.halt()
            return (A.EOK,)
        m.finish(HLT, None, "cpu_yield with no timer armed and no running domain on a channel: nothing can "
                            "wake the strand")
        return None

    def _channel_states(self) -> tuple[tuple[int, bool], ...]:
        """Each channel's state and whether its other domain still runs (what cpu_yield's wait watches)."""
        return tuple((e.state(), e.peer.owner is not None and e.peer.owner.running)
                     for _, e in sorted(self.endpoints.items()))

    def _woken(self) -> bool:
        return self.interrupt_pending(self.m) or any(e.rx.unread() for e in self.endpoints.values())

    def waits_outside(self, machine: Machine) -> bool:
        """In cpu_yield on a channel: wait until an entry arrives or a channel changes (the other end
        configured its queues, or its domain stopped: no entry can come any more)."""
        if not self.yielding:
            return False
        if self._woken() or self._channel_states() != self._states:
            self.yielding, machine.halted = False, False
            return False
        return True

    def hv_cpu_myid(self, *_) -> tuple[int, ...]:
        return A.EOK, 0

    def hv_tod_get(self, *_) -> tuple[int, ...]:
        return A.EOK, A.TOD_EPOCH + self.m.now() // A.CLOCK_HZ

    def hv_cons_getchar(self, *_) -> tuple[int, ...]:
        return (A.EWOULDBLOCK,)                     # the console has no input

    def hv_cons_putchar(self, char: int, *_) -> tuple[int, ...]:
        _check(char <= 0xFF, A.EINVAL)
        self.m.serial.emit(bytes([char]))
        return (A.EOK,)

    def hv_cons_write(self, ra: int, length: int, *_) -> tuple[int, ...]:
        self._ra(ra, length)
        self.m.serial.emit(self.m.memory.read(ra, length) if length else b"")
        return A.EOK, length

    # --- Logical Domain Channels ---------------------------------------------------------------------------
    def _endpoint(self, channel: int) -> Endpoint:
        end = self.endpoints.get(channel)
        _check(end is not None, A.ECHANNEL)
        return end

    def _qconf(self, end: Endpoint, queue: Queue, ra: int, entries: int) -> tuple[int, ...]:
        if entries == 0:
            queue.unconfigure()
            return (A.EOK,)
        _check(entries >= 2 and entries & (entries - 1) == 0, A.EINVAL)
        size = entries * A.QUEUE_ENTRY
        _check(ra % size == 0, A.EBADALIGN)
        self._ra(ra, size)
        queue.configure(ra, entries)
        end.channel.pump()
        return (A.EOK,)

    def hv_ldc_tx_qconf(self, channel: int, ra: int, entries: int, *_) -> tuple[int, ...]:
        end = self._endpoint(channel)
        return self._qconf(end, end.tx, ra, entries)

    def hv_ldc_rx_qconf(self, channel: int, ra: int, entries: int, *_) -> tuple[int, ...]:
        end = self._endpoint(channel)
        return self._qconf(end, end.rx, ra, entries)

    def hv_ldc_tx_qinfo(self, channel: int, *_) -> tuple[int, ...]:
        q = self._endpoint(channel).tx
        return A.EOK, q.ra, q.entries

    def hv_ldc_rx_qinfo(self, channel: int, *_) -> tuple[int, ...]:
        q = self._endpoint(channel).rx
        return A.EOK, q.ra, q.entries

    def hv_ldc_tx_get_state(self, channel: int, *_) -> tuple[int, ...]:
        end = self._endpoint(channel)
        end.channel.pump()
        return A.EOK, end.tx.head, end.tx.tail, end.state()

    def hv_ldc_rx_get_state(self, channel: int, *_) -> tuple[int, ...]:
        end = self._endpoint(channel)
        end.channel.pump()
        return A.EOK, end.rx.head, end.rx.tail, end.state()

    def hv_ldc_tx_set_qtail(self, channel: int, tail: int, *_) -> tuple[int, ...]:
        end = self._endpoint(channel)
        q = end.tx
        _check(q.configured and tail < q.size and q.tail_forward(tail), A.EINVAL)
        _check(tail % A.QUEUE_ENTRY == 0, A.EBADALIGN)
        q.tail = tail
        end.channel.pump()
        return (A.EOK,)

    def hv_ldc_rx_set_qhead(self, channel: int, head: int, *_) -> tuple[int, ...]:
        end = self._endpoint(channel)
        q = end.rx
        _check(q.configured and head < q.size and q.head_forward(head), A.EINVAL)
        _check(head % A.QUEUE_ENTRY == 0, A.EBADALIGN)
        q.head = head
        end.channel.pump()                          # room again: the peer's waiting entries move
        return (A.EOK,)
