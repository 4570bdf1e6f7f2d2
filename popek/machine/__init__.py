"""The bare machine on Unicorn: memory, boot state, devices, exception delivery (DESIGN §3.3).

Read in this order: ``engine`` (what Unicorn hides, found by calibration), ``memory`` (RAM, monitor memory,
paging), ``descriptors`` and ``faults`` (pure data), ``devices`` (COM1, exit port, 8259, 8254),
``interrupts`` (SDM delivery through the IDT), ``ioperm`` and ``umip`` (checks Unicorn does not make),
``machine`` (the ``Machine`` that owns the ``Uc`` and its hooks), ``guest`` (loading), ``result`` (the run
document), ``command`` (``popek run``). The run loop is ``popek.monitors.base.Run``, one for every monitor;
``popek.monitors.run_guest`` loads a guest on a fresh machine and runs it.
"""
from popek.machine.faults import GuestFault, Interrupt
from popek.machine.guest import Guest, load_guest
from popek.machine.machine import Machine
from popek.machine.result import Events, Exit, RunResult

__all__ = ["Machine", "Guest", "load_guest", "RunResult", "Exit", "Events", "Interrupt", "GuestFault"]
