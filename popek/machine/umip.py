"""CR4.UMIP for Unicorn, which ignores the bit: SGDT, SIDT, SLDT, SMSW and STR at CPL > 0 raise #GP(0).

A Python code hook on every instruction would cost the whole run (2.4 M instructions/s, REFERENCES). Instead,
only when the machine boots with ``umip``, a ``popek.machine.watch.Watch`` puts a code hook on exactly the
addresses of those five instructions as the guest's blocks reveal them. The hook fires before its
instruction executes; at CPL > 0 with CR4.UMIP set it stops the chunk with a pending #GP(0) at that
instruction, which is never executed.

Limits: the bit is modelled when the machine boots with it (``--umip``); a guest setting CR4.UMIP itself on
a machine booted without it is not.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from popek.machine.faults import EXCEPTION, GP, Interrupt
from popek.machine.watch import Watch

if TYPE_CHECKING:
    from popek.machine.machine import Machine

CR4_UMIP = 1 << 11
AFFECTED = frozenset({"sgdt", "sidt", "sldt", "smsw", "str"})


class Umip:
    def __init__(self, machine: Machine):
        self.m = machine
        self.watch = Watch(machine, AFFECTED, self._on_insn, kind="umip")

    def _on_insn(self, address: int, name: str) -> None:
        if self.m.cpl() == 0 or not self.m.reg("cr4") & CR4_UMIP:
            return
        self.m.stop_chunk(Interrupt(GP, EXCEPTION, 0, eip=address, insn=address, why=f"UMIP: {name} at CPL > 0"))

