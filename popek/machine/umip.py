"""CR4.UMIP for Unicorn, which ignores the bit: SGDT, SIDT, SLDT, SMSW and STR at CPL > 0 raise #GP(0).

A Python code hook on every instruction would cost the whole run (2.4 M instructions/s, REFERENCES). Instead,
only when the machine boots with ``umip``: a block hook (about 12 M blocks/s) decodes each translated block
once, and for the few UMIP-affected instructions it finds, puts a code hook on exactly that address. The
block that revealed them was translated without those hooks, so the detector drops it from Unicorn's cache
and restarts the chunk at the block's start (no instruction of it has run yet). The code hook fires before
its instruction executes; at CPL > 0 with CR4.UMIP set it stops the chunk with a pending #GP(0) at that
instruction, which is never executed.

Limits: a block is decoded once per (address, size); a self-modifying guest that turns scanned code into one
of these instructions without changing the block's size is not caught. The bit is modelled when the machine
boots with it (``--umip``); a guest setting CR4.UMIP itself on a machine booted without it is not.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import unicorn

from popek.decode import sweep
from popek.machine.faults import EXCEPTION, GP, GuestFault, Interrupt

if TYPE_CHECKING:
    from popek.machine.machine import Machine

CR4_UMIP = 1 << 11
AFFECTED = frozenset({"sgdt", "sidt", "sldt", "smsw", "str"})


class Umip:
    """``on_block`` is the machine's UC_HOOK_BLOCK (installed with the machine's other hooks); the code
    hooks it adds, one per affected instruction address, are the only hooks added while running."""

    def __init__(self, machine: Machine):
        self.m = machine
        self.scanned: set[tuple[int, int]] = set()
        self.hooked: dict[int, int] = {}        # instruction address -> code hook handle

    def on_block(self, uc, address: int, size: int, _) -> None:
        if (address, size) in self.scanned:
            return
        self.scanned.add((address, size))
        try:
            code = self.m.read_linear(address, size)
        except GuestFault:
            return
        new = [a for a, _n, mnemonic, _o in sweep(code, address, 32)
               if mnemonic in AFFECTED and a not in self.hooked]
        for a in new:
            self.hooked[a] = uc.hook_add(unicorn.UC_HOOK_CODE, self._on_insn, None, a, a)
        if new:
            self.m.events.count("umip", "blocks-rescanned")
            uc.ctl_remove_cache(address, address + size)
            self.m.stop_chunk()

    def _on_insn(self, uc, address: int, size: int, _) -> None:
        if self.m.cpl() == 0 or not self.m.reg("cr4") & CR4_UMIP:
            return
        code = self.m.read_linear(address, size)
        if not any(mnemonic in AFFECTED for _a, _n, mnemonic, _o in sweep(code, address, 32)):
            return                              # the code changed since the block was scanned
        self.m.stop_chunk(Interrupt(GP, EXCEPTION, 0, eip=address, insn=address, why="UMIP: CPL > 0"))
