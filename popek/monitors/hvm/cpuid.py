"""CPUID as the bare machine answers it, and as a hypervisor changes it.

The bare machine's answer comes from Unicorn itself: one ``cpuid`` executed on a scratch Unicorn CPU with
the guest's CR4 (OSXSAVE and OSPKE show in CPUID) per (leaf, subleaf, CR4), cached; so ``hvm`` returns
exactly what ``native`` would, except what the control set changes on purpose (``cpuid-hypervisor-bit``:
CPUID.1:ECX[31] and the hypervisor leaves 0x40000000+, as KVM, Hyper-V, VMware and Xen HVM all do).

Measured on Unicorn 2.1.4: its CPU model (QEMU's) already reports CPUID.1:ECX[31] = 1 on the bare machine,
and zeros in leaf 0x40000000. So under hvm the bit reads as natively, and the visible difference is the
hypervisor's vendor leaf (``KVMKVMKVM`` with the ``kvm`` controls).
"""
from __future__ import annotations

import struct
from functools import lru_cache

import unicorn
from unicorn import x86_const as X

HYPERVISOR_BIT = 1 << 31
HYPERVISOR_LEAVES = 0x40000000
_CODE = 0x1000


@lru_cache(maxsize=256)
def bare(leaf: int, subleaf: int, cr4: int = 0) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of ``cpuid`` on the bare machine's CPU model, with ``cr4``."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(_CODE, 0x1000)
    uc.mem_write(_CODE, b"\x0f\xa2")
    uc.reg_write(X.UC_X86_REG_CR4, cr4)
    uc.reg_write(X.UC_X86_REG_EAX, leaf)
    uc.reg_write(X.UC_X86_REG_ECX, subleaf)
    uc.emu_start(_CODE, _CODE + 2, count=1)
    return tuple(uc.reg_read(r) for r in (X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX))


def guest(leaf: int, subleaf: int, cr4: int, hypervisor_bit: bool, vendor: str) -> tuple[int, int, int, int]:
    """What the guest reads under the monitor."""
    if hypervisor_bit and HYPERVISOR_LEAVES <= leaf <= HYPERVISOR_LEAVES + 0xFF:
        if leaf == HYPERVISOR_LEAVES:
            ebx, ecx, edx = struct.unpack("<III", vendor.encode("ascii").ljust(12, b"\0"))
            return HYPERVISOR_LEAVES + 1, ebx, ecx, edx
        return 0, 0, 0, 0                         # leaf 0x40000001: no paravirtual features offered
    eax, ebx, ecx, edx = bare(leaf, subleaf, cr4)
    if leaf == 1 and hypervisor_bit:
        ecx |= HYPERVISOR_BIT
    return eax, ebx, ecx, edx
