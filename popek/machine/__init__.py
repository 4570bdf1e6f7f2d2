"""The bare machine on Unicorn: memory, boot state, devices, exception delivery (DESIGN §3.3).

``Machine`` is one machine; ``load_guest`` reads a guest file; ``RunResult`` is what a run returns. The run
loop lives in ``popek.monitors.base`` (one loop for every monitor); ``popek.monitors.run_guest`` does both.
"""
from popek.machine.faults import GuestFault, Interrupt
from popek.machine.guest import Guest, load_guest
from popek.machine.machine import Machine
from popek.machine.result import Events, Exit, RunResult

__all__ = ["Machine", "Guest", "load_guest", "RunResult", "Exit", "Events", "Interrupt", "GuestFault"]
