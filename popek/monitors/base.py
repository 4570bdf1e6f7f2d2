"""The one run loop, and the interface a monitor implements (like QEMU's translator_loop and TranslatorOps).

A monitor is a ``MonitorOps``: a small object that says what traps and how it is emulated. The loop below is
the same for every monitor: plan a chunk (the budget, the next timer event, a pending interrupt waiting for
IF), let the machine execute it, advance the devices, take an interrupt if one is due, handle hlt. The
machine asks the ops about every event before the guest's IDT sees it (``intercept``), which is where a
trap-and-emulate monitor emulates a privileged instruction that raised #GP.

The loop is a ``Run`` that can be stepped: ``Run.step(limit)`` runs at most ``limit`` more guest
instructions, so one runner can interleave several machines in fixed instruction slices (sun4v domains)
with the same loop; ``run()`` steps one machine to its end. A machine whose CPU waits for another
(``waits_outside``: a sun4v domain in cpu_yield on a channel) makes ``step`` return early, still running.

What a monitor can rely on, for the next ones (``trap``, ``bt``, ``pv``, ``hvm``, ``sun4v``, ``emulate``):
- ``attach`` runs before the first guest instruction: allocate shadow tables in monitor memory
  (``machine.memory.alloc``/``monitor_write``, read-only to the guest: set the accessed bit of every
  descriptor there), point the real GDTR/IDTR/TR at them (``machine.set_table``), add hooks
  (``machine.uc.hook_add`` with an explicit range), deprivilege the guest.
- ``intercept(machine, event)`` sees every exception, software interrupt and external interrupt with its
  error code and EIP; return True after emulating it (write registers through ``machine.set_reg``; the
  machine has already cleared Unicorn's exception state). ``machine.deliver`` reflects an event through
  the IDT the machine sees; ``popek.machine.interrupts`` has the SDM pieces to deliver through a virtual one.
- ``interrupts_enabled`` is the IF the timer interrupt obeys (a virtual IF for a deprivileged kernel);
- the platform's interrupt sources are ``next_event``, ``advance``, ``interrupt_pending``,
  ``take_interrupt`` and ``can_wake``: by default the bare machine's PIT ticking into the PIC's IRQ 0; a
  monitor whose guest has other sources (pv: event channels and a one-shot timer) overrides them;
  ``io_allowed`` may decide port I/O instead of the hardware check (for a virtual CPL and IOPL);
  ``machine.halted = True`` is how an emulated ``hlt`` waits for the next interrupt.
- ``state`` is what the result reports: the *virtual* CPU for a monitor (``vcpu.py``), the real one natively.
- Count what the monitor did in ``machine.events`` (by kind and canonical name).
"""
from __future__ import annotations

import time

from popek.machine.faults import EXTERNAL, Interrupt, NotModelled
from popek.machine.interruptible import interruptible
from popek.machine.machine import END, Machine
from popek.machine.result import BUDGET, HLT as HLT_END, INTERRUPTED, UNSUPPORTED, RunResult

# When the CPU looks at its interrupt line. Unicorn cannot tell us when IF changes (sti, popf, iret), so the
# loop samples: when the line changes (a PIT edge, a write to the PIC or PIT), at hlt, and, while a request
# waits because IF is clear, every `window` instructions. The window starts at POLL and doubles each time IF
# is still clear, up to POLL_MAX, so that a guest keeping interrupts off for long (polling a device) runs at
# full speed; it is reset when an interrupt is taken. So an interrupt pending behind a long cli section may
# be taken up to POLL_MAX instructions after the sti, and a short sti ... cli window can miss it. Every
# sample point is a guest instruction count, so runs are deterministic and the same for every monitor.
POLL, POLL_MAX = 64, 4096
# The one default instruction budget of every command and API that runs a guest (run, diff, compare,
# popek.monitors.run_guest, popek.experiments.differential).
DEFAULT_BUDGET = 100_000_000


class MonitorOps:
    """The bare machine's behaviour; a monitor overrides what it changes."""

    name = "native"
    note: str | None = None             # one line the text result ends with (what the technique is)

    def attach(self, machine: Machine) -> None:
        """Prepare the machine before the first guest instruction."""

    def intercept(self, machine: Machine, event: Interrupt) -> bool:
        """Handle ``event`` instead of the guest's IDT; True when handled."""
        return False

    def delivery_fault(self, machine: Machine, delivering: Interrupt, fault: Interrupt,
                       then: Interrupt | None) -> None:
        """``fault`` was raised while delivering ``delivering``; the CPU goes on with ``then`` (the fault
        itself, a #DF, or None: a triple fault). Only observed: hvm's exception bitmap applies to it."""

    def interrupts_enabled(self, machine: Machine) -> bool:
        return machine.interrupts_enabled()

    def io_allowed(self, machine: Machine, port: int, size: int) -> bool | None:
        """Whether an IN/OUT/INS/OUTS (one element) may complete; None lets the hardware decide from the real
        CPL, IOPL and TSS bitmap. A monitor that traps port I/O answers for its virtual CPU: True completes
        the access in the I/O hook, which is what trapping, emulating and resuming would achieve without
        leaving Unicorn (about 4 µs instead of 20); False raises the #GP the hardware would."""
        return None

    def state(self, machine: Machine) -> dict:
        """The CPU state the guest can see (DESIGN §3.4)."""
        return machine.state()

    # --- the platform's interrupt sources -------------------------------------------------------------------
    def next_event(self, machine: Machine) -> int | None:
        """Machine time of the next timer event, or None when nothing is armed."""
        return machine.pit.next_event()

    def advance(self, machine: Machine) -> int:
        """Fire what is due at ``machine.time``; the number of timer events that fired."""
        fired = machine.pit.advance(machine.time)
        if fired:
            machine.events.count("timer", "irq0", fired)
            machine.pic.raise_irq(0)
        return fired

    def interrupt_pending(self, machine: Machine) -> bool:
        """An interrupt request waits for the guest."""
        return machine.pic.pending()

    def take_interrupt(self, machine: Machine) -> bool:
        """Deliver one pending interrupt if the guest accepts it now; True when one was taken."""
        if machine.end is None and machine.pic.pending() and self.interrupts_enabled(machine):
            vector = machine.pic.acknowledge()
            eip = machine.reg("eip")
            machine.halted = False
            machine.raise_interrupt(Interrupt(vector, EXTERNAL, None, eip=eip, insn=eip, why="PIC"))
            return True
        return False

    def can_wake(self, machine: Machine) -> bool:
        """Whether the next timer event can wake a halted CPU (IRQ 0 not masked or blocked at the PIC)."""
        return machine.pic.could_take(0)

    def waits_outside(self, machine: Machine) -> bool:
        """The halted CPU waits for something only another machine can do (an entry on a channel from another
        domain): ``Run.step`` returns and the runner steps the others. False: the usual hlt wait."""
        return False

    def detach(self, machine: Machine) -> None:
        """The run is over; last chance to add events."""


class Run:
    """One machine's run under one monitor; ``step`` it, then take its ``result``. Every end is a result,
    never an exception."""

    def __init__(self, machine: Machine, ops: MonitorOps, max_instructions: int = DEFAULT_BUDGET):
        assert max_instructions >= 0
        self.machine, self.ops, self.budget = machine, ops, max_instructions
        self.window, self.sample_at = POLL, None
        self._detached = False
        machine.ops = ops
        started = time.perf_counter()
        ops.attach(machine)
        self.wall = time.perf_counter() - started

    def step(self, limit: int | None = None) -> bool:
        """Run until ``limit`` more guest instructions have executed (None: no limit) or the run ends; True
        while it goes on."""
        m, ops = self.machine, self.ops
        started = time.perf_counter()
        stop_at = None if limit is None else m.instructions + limit
        with interruptible(m):              # SIGINT ends the run with reason `interrupted`
            try:
                self._loop(stop_at)
            except NotModelled as exc:      # raised between chunks (in a monitor's intercept)
                m.finish(UNSUPPORTED, None, f"{ops.name}: {exc} is not modelled")
        self.wall += time.perf_counter() - started
        if m.end is not None and not self._detached:
            self._detached = True
            ops.detach(m)
        return m.end is None

    def _loop(self, stop_at: int | None) -> None:
        m, ops = self.machine, self.ops
        while m.end is None:
            if m.stop_requested:
                m.finish(INTERRUPTED, None, "SIGINT")
                break
            left = self.budget - m.instructions
            if left <= 0:
                m.finish(BUDGET, None, f"{self.budget} instructions")
                break
            if stop_at is not None:
                if m.instructions >= stop_at:
                    break
                left = min(left, stop_at - m.instructions)
            if m.halted:
                if ops.waits_outside(m):
                    break                       # another machine must act first (a sun4v domain's cpu_yield)
                if m.halted:                    # (waits_outside may have woken it)
                    self._wait()
                continue
            event = ops.next_event(m)
            chunk = min(left, max(1, event - m.time) if event is not None else left)
            if self.sample_at is not None:
                chunk = min(chunk, max(1, self.sample_at - m.time))
            m.devices_changed = False
            if m.execute(chunk) == END:
                break
            fired = ops.advance(m)
            if m.halted:
                continue                        # hlt: _wait decides (it also takes a pending interrupt)
            if fired or m.devices_changed or (self.sample_at is not None and m.time >= self.sample_at):
                self._sample()

    def _sample(self) -> None:
        """The CPU looks at its interrupt line (see POLL)."""
        m, ops = self.machine, self.ops
        if ops.take_interrupt(m):
            self.window, self.sample_at = POLL, None
        elif ops.interrupt_pending(m):
            self.sample_at = m.time + self.window
            self.window = min(2 * self.window, POLL_MAX)
        else:
            self.sample_at = None

    def _wait(self) -> None:
        """hlt: with IF clear the run ends; otherwise skip time to the interrupt that will wake the CPU, or end
        the run when nothing armed can."""
        m, ops = self.machine, self.ops
        if not ops.interrupts_enabled(m):
            m.finish(HLT_END, None, "hlt with interrupts disabled")
            return
        if not ops.interrupt_pending(m):
            event = ops.next_event(m)
            if event is None or not ops.can_wake(m):
                m.finish(HLT_END, None, "hlt with no interrupt source armed")
                return
            m.events.count("idle", "clocks", event - m.time)
            m.time = event
            ops.advance(m)
        ops.take_interrupt(m)

    def result(self) -> RunResult:
        m, ops = self.machine, self.ops
        return RunResult(monitor=ops.name, guest=m.guest.name if m.guest else "", exit=m.end,
                         console=m.serial.output.decode("utf-8", "replace"), state=ops.state(m),
                         events=m.events.to_dict(), guest_instructions=m.instructions,
                         wall_seconds=round(self.wall, 6), memory=m.memory.image(),
                         extra={"note": ops.note} if ops.note else {})


def run(machine: Machine, ops: MonitorOps, max_instructions: int = DEFAULT_BUDGET) -> RunResult:
    """Run the loaded guest under ``ops`` until it ends."""
    r = Run(machine, ops, max_instructions)
    if r.step():                                # alone, nothing else can wake a machine that waits outside
        machine.finish(HLT_END, None, "waiting for another machine, and there is none")
        r.step()
    return r.result()
