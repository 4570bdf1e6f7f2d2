"""CPUID as a hypervisor changes it.

The bare machine's answer is ``popek.machine.cpuid.bare`` (Unicorn's CPU model with the guest's CR4, and
CPUID.1:ECX[31] = 0 as on the hardware); ``hvm`` returns exactly that, except what the control set changes
on purpose (``cpuid-hypervisor-bit``: CPUID.1:ECX[31] = 1 and the hypervisor leaves 0x40000000+, as KVM,
Hyper-V, VMware and Xen HVM all do). So under hvm a guest that tests the bit or reads the vendor leaf
(``KVMKVMKVM`` with the ``kvm`` controls) sees a hypervisor, and natively it does not.
"""
from __future__ import annotations

import struct

from popek.machine.cpuid import HYPERVISOR_BIT, bare

HYPERVISOR_LEAVES = 0x40000000
__all__ = ["HYPERVISOR_BIT", "HYPERVISOR_LEAVES", "bare", "guest"]


def guest(leaf: int, subleaf: int, cr4: int, xcr0: int, hypervisor_bit: bool,
          vendor: str) -> tuple[int, int, int, int]:
    """What the guest reads under the monitor."""
    if hypervisor_bit and HYPERVISOR_LEAVES <= leaf <= HYPERVISOR_LEAVES + 0xFF:
        if leaf == HYPERVISOR_LEAVES:
            ebx, ecx, edx = struct.unpack("<III", vendor.encode("ascii").ljust(12, b"\0"))
            return HYPERVISOR_LEAVES + 1, ebx, ecx, edx
        return 0, 0, 0, 0                         # leaf 0x40000001: no paravirtual features offered
    eax, ebx, ecx, edx = bare(leaf, subleaf, cr4, xcr0)
    if leaf == 1 and hypervisor_bit:
        ecx |= HYPERVISOR_BIT
    return eax, ebx, ecx, edx
