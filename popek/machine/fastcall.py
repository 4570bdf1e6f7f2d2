"""SYSENTER and SYSEXIT as the SDM defines them (Vol. 2B; 32-bit protected mode), for the bare machine and
for the monitors that emulate them.

Unicorn 2.1.4 does not execute ``sysenter``: its helper only calls the instruction hooks and steps EIP over
it (qemu/target/i386/seg_helper.c, ``helper_sysenter``), so natively the guest ran on at the next
instruction, at its own CPL. The machine carries it out itself (quirks: ``sysenter-not-executed``);
``sysexit`` Unicorn executes as the SDM says. Both take their selectors from IA32_SYSENTER_CS and load fixed
flat segments without reading the GDT (``flat_segments``): the machine, and the monitors' routines, write
those segment caches directly (engine notes 9). A monitor that compresses the guest's rings (trap) takes the
virtual CPL after a transfer it did not see from the guest's descriptor of CS, so there the GDT must hold
the flat descriptors (the SDM asks an operating system to provide them); where it does not
(``unlike_flat``), the run ends ``unsupported``, saying so.
"""
from __future__ import annotations

from typing import Callable

from popek.machine.descriptors import Descriptor
from popek.machine.engine import SegmentCache
from popek.machine.faults import GP, GuestFault

SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP = 0x174, 0x175, 0x176
IF, RF, VM = 1 << 9, 1 << 16, 1 << 17
SYSENTER_CLEARS = VM | IF | RF          # EFLAGS bits sysenter clears
# The descriptor flags of the segments loaded (SDM: G = 1, D/B = 1, P = 1, S = 1; code type 11, execute/read
# accessed; stack type 3, read/write accessed), before the DPL.
FLAT_CODE = 1 << 23 | 1 << 22 | 1 << 15 | 1 << 12 | 0xB << 8
FLAT_STACK = 1 << 23 | 1 << 22 | 1 << 15 | 1 << 12 | 0x3 << 8


def flat_segments(cs: int, ss: int, dpl: int) -> dict[str, SegmentCache]:
    """The CS and SS caches sysenter (``dpl`` 0) or sysexit (3) loads for selectors ``cs`` and ``ss``."""
    return {"cs": SegmentCache(cs, 0, 0xFFFFFFFF, FLAT_CODE | dpl << 13),
            "ss": SegmentCache(ss, 0, 0xFFFFFFFF, FLAT_STACK | dpl << 13)}


def _code_selector(read_msr: Callable[[int], int], name: str) -> int:
    cs = read_msr(SYSENTER_CS) & 0xFFFC
    if not cs:
        raise GuestFault(GP, 0, f"{name} with IA32_SYSENTER_CS[15:2] = 0")
    return cs


def sysenter(read_msr: Callable[[int], int]) -> tuple[int, int, int, int]:
    """(CS, SS, EIP, ESP) that sysenter loads at CPL 0, from the MSRs ``read_msr`` reads."""
    cs = _code_selector(read_msr, "sysenter")
    return cs, cs + 8, read_msr(SYSENTER_EIP) & 0xFFFFFFFF, read_msr(SYSENTER_ESP) & 0xFFFFFFFF


def sysexit(read_msr: Callable[[int], int], cpl: int, edx: int, ecx: int) -> tuple[int, int, int, int]:
    """(CS, SS, EIP, ESP) that a 32-bit sysexit loads at CPL 3: EIP from EDX, ESP from ECX."""
    cs = _code_selector(read_msr, "sysexit")
    if cpl:
        raise GuestFault(GP, 0, f"sysexit at CPL {cpl}")
    return (cs + 16) | 3, (cs + 24) | 3, edx, ecx


def unlike_flat(descriptor: Callable[[int], Descriptor], cs: int, ss: int, cpl: int) -> str | None:
    """Why the GDT's descriptors at ``cs`` and ``ss`` are not the flat ones sysenter/sysexit load at ``cpl``
    (``descriptor`` reads one, raising GuestFault where there is none); None when they are."""
    for selector, code in ((cs, True), (ss, False)):
        try:
            d = descriptor(selector)
        except GuestFault:
            return f"no descriptor at {selector:#x}"
        flat = d.present and not d.system and d.base == 0 and d.limit == 0xFFFFFFFF and d.big and d.dpl == cpl
        kind = d.is_code and not d.conforming if code else d.writable_data
        if not (flat and kind):
            return f"the descriptor at {selector:#x} is not the flat {'code' if code else 'data'} segment loaded"
    return None
