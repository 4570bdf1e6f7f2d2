"""Where ``bt``'s callouts differ from the shared emulation routines (popek.monitors.emulation).

``bt`` calls the shared routines for every callout; an entry here replaces one where the bare machine does
something else than the routine, found by the differential tests (popek.experiments.differential). Each
entry says what the bare machine does.
"""
from __future__ import annotations

from popek.monitors import emulation
from popek.monitors.emulation import MEM, REG, get_reg, set_reg


def smsw(m, v, r):
    """``smsw r32``: Unicorn 2.1.4 writes the low 16 bits of CR0 and keeps the register's upper half (the
    SDM leaves those bits undefined); the shared routine writes all of CR0."""
    op = r.operands[0]
    if op.kind == REG and op.size == 4 and op.kind != MEM:
        emulation._umip(v, r)
        set_reg(m, op.reg, (get_reg(m, op.reg) & 0xFFFF0000) | (v.cr0 & 0xFFFF))
        return r.next
    return emulation.smsw(m, v, r)


OVERRIDES = {"smsw": smsw}


def routine(name: str):
    return OVERRIDES.get(name) or emulation.TABLE[name]
