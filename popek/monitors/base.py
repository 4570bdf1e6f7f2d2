"""The one run loop, and the interface a monitor implements (like QEMU's translator_loop and TranslatorOps).

A monitor is a ``MonitorOps``: a small object that says what traps and how it is emulated. The loop below is
the same for every monitor: plan a chunk (the budget, the next timer event, a pending interrupt waiting for
IF), let the machine execute it, advance the devices, take an interrupt if one is due, handle hlt. The
machine asks the ops about every event before the guest's IDT sees it (``intercept``), which is where a
trap-and-emulate monitor emulates a privileged instruction that raised #GP.

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
  ``io_allowed`` may decide port I/O instead of the hardware check (for a virtual CPL and IOPL);
  ``machine.halted = True`` is how an emulated ``hlt`` waits for the next interrupt.
- ``state`` is what the result reports: the *virtual* CPU for a monitor (``vcpu.py``), the real one natively.
- Count what the monitor did in ``machine.events`` (by kind and canonical name).
"""
from __future__ import annotations

import time

from popek.machine.faults import EXTERNAL, Interrupt
from popek.machine.interruptible import interruptible
from popek.machine.machine import END, Machine
from popek.machine.result import BUDGET, HLT as HLT_END, INTERRUPTED, RunResult

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

    def attach(self, machine: Machine) -> None:
        """Prepare the machine before the first guest instruction."""

    def intercept(self, machine: Machine, event: Interrupt) -> bool:
        """Handle ``event`` instead of the guest's IDT; True when handled."""
        return False

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

    def detach(self, machine: Machine) -> None:
        """The run is over; last chance to add events."""


def run(machine: Machine, ops: MonitorOps, max_instructions: int = DEFAULT_BUDGET) -> RunResult:
    """Run the loaded guest under ``ops`` until it ends; every end is a result, never an exception.
    SIGINT ends it early with reason ``interrupted`` (popek.machine.interruptible)."""
    assert max_instructions >= 0
    machine.ops = ops
    started = time.perf_counter()
    ops.attach(machine)
    with interruptible(machine):
        _loop(machine, ops, max_instructions)
    ops.detach(machine)
    end = machine.end
    return RunResult(monitor=ops.name, guest=machine.guest.name if machine.guest else "", exit=end,
                     console=machine.serial.output.decode("utf-8", "replace"), state=ops.state(machine),
                     events=machine.events.to_dict(), guest_instructions=machine.instructions,
                     wall_seconds=round(time.perf_counter() - started, 6), memory=machine.memory.image())


def _loop(machine: Machine, ops: MonitorOps, max_instructions: int) -> None:
    window, sample_at = POLL, None
    while machine.end is None:
        if machine.stop_requested:
            machine.finish(INTERRUPTED, None, "SIGINT")
            break
        left = max_instructions - machine.instructions
        if left <= 0:
            machine.finish(BUDGET, None, f"{max_instructions} instructions")
            break
        if machine.halted:
            _wait(machine, ops)
            continue
        chunk = min(left, _until_next_event(machine))
        if sample_at is not None:
            chunk = min(chunk, max(1, sample_at - machine.time))
        machine.devices_changed = False
        if machine.execute(chunk) == END:
            break
        fired = _advance(machine)
        if machine.halted:
            continue                            # hlt: _wait decides (it also takes a pending interrupt)
        if fired or machine.devices_changed or (sample_at is not None and machine.time >= sample_at):
            if _take_interrupt(machine, ops):
                window, sample_at = POLL, None
            elif machine.pic.pending():
                sample_at = machine.time + window
                window = min(2 * window, POLL_MAX)
            else:
                sample_at = None


def _until_next_event(machine: Machine) -> int:
    event = machine.pit.next_event()
    return max(1, event - machine.time) if event is not None else 1 << 62


def _advance(machine: Machine) -> int:
    fired = machine.pit.advance(machine.time)
    if fired:
        machine.events.count("timer", "irq0", fired)
        machine.pic.raise_irq(0)
    return fired


def _take_interrupt(machine: Machine, ops: MonitorOps) -> bool:
    if machine.end is None and machine.pic.pending() and ops.interrupts_enabled(machine):
        vector = machine.pic.acknowledge()
        eip = machine.reg("eip")
        machine.halted = False
        machine.raise_interrupt(Interrupt(vector, EXTERNAL, None, eip=eip, insn=eip, why="PIC"))
        return True
    return False


def _wait(machine: Machine, ops: MonitorOps) -> None:
    """hlt: with IF clear the run ends; otherwise skip time to the interrupt that will wake the CPU, or end
    the run when nothing armed can (no PIT event, or IRQ 0 masked or blocked at the PIC)."""
    if not ops.interrupts_enabled(machine):
        machine.finish(HLT_END, None, "hlt with interrupts disabled")
        return
    if not machine.pic.pending():
        event = machine.pit.next_event()
        if event is None or not machine.pic.could_take(0):
            machine.finish(HLT_END, None, "hlt with no interrupt source armed")
            return
        machine.events.count("idle", "clocks", event - machine.time)
        machine.time = event
        _advance(machine)
    _take_interrupt(machine, ops)
