"""Shadow paging: the real page directory (and, under ring 3, page tables) a monitor derives from the guest's.

- **Page directory**, while the guest pages: the guest's PDEs (accessed bits preset) plus one PDE that
  maps monitor memory at its physical address, so that the real CPU reaches the shadow tables through the
  guest's address space. Under ``ring=1`` (supervisor for paging) the page tables are the guest's own;
  under ``ring=3`` they are copies with U/S set (``_shadow_image``). Resynchronised, like a TLB, on mov to
  CR0/CR3/CR4, on invlpg, and before a page fault is reflected (a "hidden" fault: the guest had made an
  entry present without telling the CPU, which real CPUs allow). Limits: 32-bit paging only (no PAE);
  the 4 MiB of linear space around monitor memory is the monitor's; the CPU sets no accessed or dirty bit
  in the guest's own tables under ``ring=3``.
"""
from __future__ import annotations

import struct
from array import array
from typing import TYPE_CHECKING

from popek.machine.faults import GuestFault
from popek.machine.memory import CR0_PG, CR0_WP, CR4_PSE

if TYPE_CHECKING:
    from popek.machine.machine import Machine
    from popek.monitors.vcpu import VCpu

# Real CR0: the monitor's PE | ET, plus what the guest's address space and FPU use (PG, WP, and TS/EM/MP,
# whose #NM faults belong to the guest). NE, AM, CD and NW stay virtual: AM, for one, would make the
# deprivileged kernel's unaligned accesses fault (#AC applies at CPL 3).
CR0_PASS = CR0_PG | CR0_WP | 0x8 | 0x4 | 0x2
CR0_MONITOR = 0x11
# Real CR4: the guest's paging and feature bits that mean the same at any ring; not VME/PVI (no
# virtual-8086 mode here) or PAE (the shadow page directory is 32-bit paging only).
CR4_PASS = 0x4 | 0x8 | CR4_PSE | 0x80 | 0x100 | 0x200 | 0x400 | 0x800
PDE_PRESENT, PDE_WRITE, PDE_USER, PDE_ACCESSED, PDE_DIRTY, PDE_LARGE = 1, 2, 4, 0x20, 0x40, 0x80
POOL_TABLES = 96            # shadow page tables under ring 3: 384 KiB of monitor memory, 384 MiB mapped


class ShadowPaging:
    """The real page directory for the guest's paging (module docstring), and the page table that maps
    monitor memory into every guest address space (``pt``: a monitor may map more of its own there)."""

    def __init__(self, machine: Machine, vcpu: VCpu):
        self.m, self.v = machine, vcpu
        memory = machine.memory
        self.pd = memory.alloc(0x1000, 0x1000)
        self.pt = memory.alloc(0x1000, 0x1000)
        self._image: tuple[bytes, tuple[bytes, ...]] | None = None   # the shadow paging structures
        self._tables: int | None = None             # the page-table pool, allocated when first needed
        self._map_monitor_memory()

    def _map_monitor_memory(self) -> None:
        memory = self.m.memory
        entries = bytearray(0x1000)
        start = memory.monitor_base & ~0x3FFFFF
        for page in range(memory.monitor_base, memory.monitor_end, 0x1000):
            struct.pack_into("<I", entries, ((page - start) >> 12) * 4,
                             page | PDE_PRESENT | PDE_USER | PDE_ACCESSED | PDE_DIRTY)
        memory.monitor_write(self.pt, bytes(entries))
        self._monitor_pde = (memory.monitor_base >> 22, self.pt | PDE_PRESENT | PDE_USER | PDE_ACCESSED)

    def paging_changed(self) -> bool:
        """Make the real CR0/CR3/CR4 follow the guest's; True when the shadow paging structures changed."""
        v, m = self.v, self.m
        changed = False
        if v.cr0 & CR0_PG:
            image = self._shadow_image()
            changed = image != self._image
            if changed:
                self._image = image
                directory, tables = image
                m.memory.monitor_write(self.pd, directory)
                for slot, table in enumerate(tables):
                    m.memory.monitor_write(self._pool(slot), table)
        m.set_reg("cr4", v.cr4 & CR4_PASS)
        m.set_reg("cr0", CR0_MONITOR | (v.cr0 & CR0_PASS))
        m.set_reg("cr3", self.pd if v.cr0 & CR0_PG else v.cr3)     # a CR3 write also flushes the TLB
        return changed

    def _shadow_image(self) -> tuple[bytes, tuple[bytes, ...]]:
        """The shadow page directory, and under ring 3 the shadow page tables, for the guest's tables now.

        Accessed (and, for 4 MiB pages, dirty) bits are preset: the CPU must never write them into monitor
        memory. Under ring 3 the guest kernel's accesses are user-mode accesses, so every entry gets U/S
        (and R/W while the guest's CR0.WP is clear, when its kernel may write read-only pages): the guest's
        own user/supervisor protection is lost, as ring compression loses it on real hardware; each page
        table the guest points to is copied into a pool (``POOL_TABLES``; past it, the guest's table is used
        unchanged and its supervisor pages fault)."""
        user = self.v.ring == 3
        force = (PDE_USER | (0 if self.v.cr0 & CR0_WP else PDE_WRITE)) if user else 0
        directory = array("I", self._read_physical(self.v.cr3 & ~0xFFF))
        tables: list[bytes] = []
        for i, pde in enumerate(directory):
            if not pde & PDE_PRESENT:
                continue
            pde |= PDE_ACCESSED | force
            if pde & PDE_LARGE and self.v.cr4 & CR4_PSE:
                pde |= PDE_DIRTY
            elif user and len(tables) < POOL_TABLES:
                entries = array("I", self._read_physical(pde & ~0xFFF))
                for j, pte in enumerate(entries):
                    if pte & PDE_PRESENT:
                        entries[j] = pte | PDE_ACCESSED | PDE_DIRTY | force
                pde = self._pool(len(tables)) | (pde & 0xFFF)
                tables.append(entries.tobytes())
            directory[i] = pde
        index, pde = self._monitor_pde
        directory[index] = pde
        return directory.tobytes(), tuple(tables)

    def _pool(self, slot: int) -> int:
        if self._tables is None:
            self._tables = self.m.memory.alloc(POOL_TABLES * 0x1000, 0x1000)
        return self._tables + slot * 0x1000

    def _read_physical(self, address: int) -> bytes:
        try:
            return self.m.memory.read(address, 0x1000)
        except GuestFault:
            return bytes(0x1000)
