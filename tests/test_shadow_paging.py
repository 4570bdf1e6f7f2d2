"""Shadow paging leaves the accessed and dirty bits in the guest's own page tables that the CPU sets on the
bare machine: entries filled on demand (the first access faults to the monitor, which sets A), pages
read-only until their first write (which sets D), monitor accesses on the guest's behalf marked as the CPU's
walks are (issue 8: paging.s under bt and trap left the PDE at 0x180000 without its accessed bit)."""
from __future__ import annotations

from pathlib import Path

import pytest

from popek.asm import assemble_text
from popek.experiments.divergence import judge
from popek.machine import Guest
from popek.monitors import run_guest

GUESTS = Path(__file__).resolve().parent.parent / "samples" / "guests"
MONITORS = [("trap", {}), ("trap", {"ring": 1}), ("bt", {}), ("hvm", {"controls": "vtx-2005"})]

# 4 KiB pages in the first 4 MiB and three 4 MiB pages above: one read (A, not D), one written (A and D),
# one never touched (neither); an interrupt frame pushed onto a stack page that nothing else touched (D by
# the delivery itself). The guest prints what it finds, and guest RAM holds the rest.
LARGE = r"""
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 15
        .equ PD, 0x180000
        .equ PT, 0x181000
_start:
        pm_setup
        set_gate 0x40, handler, INTGATE
        mov eax, cr4
        or eax, 0x10                    ; PSE
        mov cr4, eax
        identity_map PD, PT
        mov dword ptr [PD + 4], 0x400083
        mov dword ptr [PD + 8], 0x800083
        mov dword ptr [PD + 12], 0xC00083
        enable_paging PD, 0x80010000    ; PG, WP
        mov eax, [0x400010]             ; read: A only
        mov dword ptr [0x800010], 1     ; write: A and D
        mov esp, 0x3F0000               ; a stack page nothing touched yet
        int 0x40                        ; the frame sets its A and D
        mov esp, 0x90000
        print "pde: "
        print_hex32 [PD + 4]
        print " "
        print_hex32 [PD + 8]
        print " "
        print_hex32 [PD + 12]
        print " pte: "
        print_hex32 [PT + 0x3EF * 4]
        print "\n"
        summary "large"
handler:
        iretd
        console_lib
        pm_data
"""


def _guest(text: str, name: str) -> Guest:
    program = assemble_text(text, name=name, include_dirs=(str(GUESTS),))
    return Guest(name, ((program.origin, program.image),), program.entry, "asm")


@pytest.mark.parametrize("monitor, options", MONITORS, ids=[f"{m}{o}" for m, o in MONITORS])
@pytest.mark.parametrize("name", ["paging.s", "large"])
def test_accessed_and_dirty_bits_as_natively(name, monitor, options):
    guest = _guest(LARGE, "large.s") if name == "large" else str(GUESTS / name)
    native = run_guest(guest, "native", profile=None)
    other = run_guest(guest, monitor, profile=None, **options)
    assert native.exit.reason == "exit-port"
    if name == "large":
        assert "pde: 004000a3 008000e3 00c00083" in native.console       # hardware's bits, on the bare machine
    verdict = judge(native, other)
    page_tables = [r for r in verdict.ranges if 0x180000 <= r[0] < 0x182000]
    if monitor == "trap":
        # trap's known difference: the CPU sets descriptor accessed bits in the shadow GDT, so the write that
        # sets one natively (an interrupt delivery's CS load) never dirties the guest's GDT page (0x100000).
        page_tables = [r for r in page_tables if r != (0x181400, 0x181401)]
    assert not page_tables, verdict.differences
    assert native.console == other.console
