"""XSETBV as the SDM defines it (Vol. 2B, XSETBV), for the bare machine and the monitors that emulate it.

Unicorn departs from it in two cases (quirks: ``xsetbv-checks``): at CPL > 0 it raises #GP before looking
at CR4.OSXSAVE, where the hardware's #UD comes first; and it accepts an XCR0 with bit 2 (AVX state) set and
bit 1 (SSE state) clear, which the hardware refuses with #GP(0). ``fault`` gives the hardware's answer; the
machine applies it at an ``xsetbv`` before Unicorn runs one, and the monitors that emulate the instruction
(trap at its #GP, bt at its callout) apply it too and then set XCR0 themselves.
"""
from __future__ import annotations

from popek.machine.cpuid import bare
from popek.machine.faults import GP, UD

OSXSAVE = 1 << 18                   # CR4.OSXSAVE
X87, SSE, AVX = 1, 2, 4             # XCR0 state components 0-2


def supported() -> int:
    """The XCR0 bits this CPU lets software set: CPUID.(EAX=0DH,ECX=0):EDX:EAX."""
    eax, _ebx, _ecx, edx = bare(0xD, 0, OSXSAVE)
    return edx << 32 | eax


def fault(cpl: int, cr4: int, xcr: int, value: int) -> tuple[int, str] | None:
    """(vector, why) of the fault ``xsetbv`` raises writing ``value`` (EDX:EAX) into XCR ``xcr`` (ECX) at
    ``cpl`` with ``cr4``, in the SDM's order; None when it writes it. The error code is 0."""
    if not cr4 & OSXSAVE:
        return UD, "xsetbv with CR4.OSXSAVE = 0"
    if cpl:
        return GP, f"xsetbv at CPL {cpl}"
    if xcr != 0:
        return GP, f"xsetbv to XCR{xcr}, which does not exist"
    if not value & X87:
        return GP, "xsetbv clearing XCR0[0] (x87 state)"
    if value & ~supported():
        return GP, f"xsetbv setting XCR0 bits {value & ~supported():#x} that CPUID leaf 0xD does not report"
    if value & (SSE | AVX) == AVX:
        return GP, "xsetbv setting XCR0[2:1] to 10b (AVX state without SSE state)"
    return None


def unicorn_fault(cpl: int, cr4: int, xcr: int, value: int) -> int | None:
    """The vector Unicorn 2.1.4 raises instead (translate.c, then helper_xsetbv); None when it writes XCR0."""
    if cpl:
        return GP
    if not cr4 & OSXSAVE:
        return UD
    if xcr != 0 or not value & X87 or value & ~supported():
        return GP
    return None
