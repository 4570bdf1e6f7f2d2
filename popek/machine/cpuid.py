"""CPUID as the bare machine answers it.

The answer is Unicorn's CPU model (QEMU's), with the guest's CR4 (OSXSAVE and OSPKE show in CPUID), except
one bit: Unicorn reports CPUID.1:ECX[31] = 1, the bit the SDM lists as "not used, always returns 0" (Vol. 2A,
CPUID, feature information in ECX) and a hypervisor sets to say it is one. The bare machine is the
hardware, so there it reads 0 (a VM-detection guest that tests it must find no hypervisor natively); hvm
sets it on purpose (popek.monitors.hvm.cpuid). Leaves 0x40000000 and above return what Unicorn returns:
zeros.

``bare`` runs one ``cpuid`` on a scratch Unicorn CPU per (leaf, subleaf, CR4, XCR0), cached; the machine's
CPUID hook answers every guest ``cpuid`` of leaf 1 from it, under every monitor that lets the instruction
run, and lets Unicorn answer the others. XCR0 matters to leaf 0xD (and 0xE-0x1F, which repeat it on this
model): the size of the XSAVE area for the enabled state. Unicorn has no register id for XCR0; the scratch
CPU gets it written into its state (popek.machine.engine, engine notes 8).
"""
from __future__ import annotations

from functools import lru_cache

import unicorn
from unicorn import x86_const as X

from popek.machine.engine import layout, write_context_field

HYPERVISOR_BIT = 1 << 31             # CPUID.1:ECX[31]
_CODE = 0x1000
_OUT = (X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX)


@lru_cache(maxsize=256)
def unicorn_cpuid(leaf: int, subleaf: int, cr4: int = 0, xcr0: int = 1) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of ``cpuid`` on Unicorn's CPU model, with ``cr4`` and ``xcr0``."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(_CODE, 0x1000)
    uc.mem_write(_CODE, b"\x0f\xa2")
    uc.reg_write(X.UC_X86_REG_CR4, cr4)
    if xcr0 != 1:
        write_context_field(uc, layout().xcr0, xcr0)
    uc.reg_write(X.UC_X86_REG_EAX, leaf)
    uc.reg_write(X.UC_X86_REG_ECX, subleaf)
    uc.emu_start(_CODE, _CODE + 2, count=1)
    return tuple(uc.reg_read(r) for r in _OUT)


def bare(leaf: int, subleaf: int, cr4: int = 0, xcr0: int = 1) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of ``cpuid`` on the bare machine."""
    eax, ebx, ecx, edx = unicorn_cpuid(leaf, subleaf, cr4, xcr0)
    if leaf == 1:
        ecx &= ~HYPERVISOR_BIT
    return eax, ebx, ecx, edx


def on_cpuid(machine, uc, _) -> int:
    """Unicorn's CPUID instruction hook. Leaf 1: answer as the bare machine and skip Unicorn's own answer
    (1). Every other leaf: let Unicorn answer (0)."""
    engine = machine.engine
    if engine.read(X.UC_X86_REG_EAX) != 1:
        return 0
    for reg, value in zip(_OUT, bare(1, engine.read(X.UC_X86_REG_ECX), engine.read(X.UC_X86_REG_CR4))):
        engine.write(reg, value)
    machine.events.count("corrected", "cpuid-hypervisor-bit")
    return 1
