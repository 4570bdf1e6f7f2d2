"""Shadow paging: the real page directory (and, under ring 3, page tables) a monitor derives from the guest's.

- **Page directory**, while the guest pages: the guest's PDEs plus one PDE that maps monitor memory at its
  physical address, so that the real CPU reaches the shadow tables through the guest's address space.
  Under ``ring=1`` (supervisor for paging) the page tables are the guest's own; under ``ring=3`` they are
  copies with U/S set (``_shadow_image``). Resynchronised, like a TLB, on mov to CR0/CR3/CR4, on invlpg,
  and before a page fault is reflected (a "hidden" fault: the guest had made an entry present without
  telling the CPU, which real CPUs allow).
- **Accessed and dirty bits**, which the CPU sets in the entries it walks — here the shadow entries, in
  monitor memory, not the guest's. So the shadow is filled on demand, as shadow-paging VMMs do: a guest
  entry whose accessed bit is clear is not present in the shadow; the first access faults to the monitor
  (``hidden_fault``), which sets the bit in the guest's own entry when the guest's tables allow the access
  and fills the shadow entry. A page whose dirty bit is clear is mapped read-only until its first write,
  which sets the guest's dirty bit the same way. Shadow entries carry A and D set, so the CPU never writes
  monitor memory.

Limits: 32-bit paging only (no PAE); the 4 MiB of linear space around monitor memory is the monitor's.
Under ``ring=1`` (and hvm's shadow paging) the real CR0.WP is the guest's: with it clear, a supervisor write
to a 4 MiB page whose dirty bit is clear does not fault, so that bit stays clear (the run shows it as a RAM
difference); under ``ring=3`` every access is a user access and both bits follow the CPU.
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
CR4_PASS = 0x4 | 0x8 | CR4_PSE | 0x80 | 0x100 | 0x200 | 0x400 | 0x800 | 0x40000     # (0x40000: OSXSAVE)
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
        memory.on_mark = self._guest_marked

    def _guest_marked(self) -> None:
        """A monitor access on the guest's behalf set accessed/dirty bits (Memory.linear): the shadow entries
        they open are filled now, before the guest runs again (a fault on them could otherwise come inside
        another delivery, which the CPU would turn into a double fault)."""
        if self.v.cr0 & CR0_PG:
            self.paging_changed()

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
            if not pde & PDE_ACCESSED:                  # not present, or not yet accessed: on demand
                directory[i] = 0
                continue
            if pde & PDE_LARGE and self.v.cr4 & CR4_PSE:
                pde = _filled(pde, force)
            elif user and len(tables) < POOL_TABLES:
                entries = array("I", self._read_physical(pde & ~0xFFF))
                for j, pte in enumerate(entries):
                    entries[j] = _filled(pte, force) if pte & PDE_ACCESSED else 0
                pde = self._pool(len(tables)) | (pde & 0xFFF) | PDE_ACCESSED | force
                tables.append(entries.tobytes())
            else:
                pde |= PDE_ACCESSED | force
            directory[i] = pde
        index, pde = self._monitor_pde
        directory[index] = pde
        return directory.tobytes(), tuple(tables)

    def hidden_fault(self, address: int, error_code: int | None) -> bool:
        """A #PF the monitor sees first: when the guest's tables allow the access, set the accessed (and, for a
        write, dirty) bits the CPU would have set in the guest's entries; then resynchronise. True when the
        shadow changed, so that the fault was the monitor's own and the instruction runs again."""
        if self.v.cr0 & CR0_PG and error_code is not None:
            self._set_accessed(address, write=bool(error_code & 2))
        return self.paging_changed()

    def _set_accessed(self, address: int, write: bool) -> None:
        """The bits a page walk for ``address`` sets, where the guest's own tables allow the access at the
        virtual CPL (what a real walk sets before it would fault is left as it is)."""
        memory, v = self.m.memory, self.v
        user, wp = v.cpl == 3, bool(v.cr0 & CR0_WP)
        pde_at = (v.cr3 & ~0xFFF) + (address >> 22) * 4
        pde = _entry(memory, pde_at)
        if pde is None or not pde & PDE_PRESENT:
            return
        if pde & PDE_LARGE and v.cr4 & CR4_PSE:
            if _allowed(pde, user, write, wp):
                _update(memory, pde_at, pde, PDE_ACCESSED | (PDE_DIRTY if write else 0))
            return
        pte_at = (pde & ~0xFFF) + ((address >> 12) & 0x3FF) * 4
        pte = _entry(memory, pte_at)
        if pte is None or not pte & PDE_PRESENT or not _allowed(pde & pte, user, write, wp):
            return
        _update(memory, pde_at, pde, PDE_ACCESSED)
        _update(memory, pte_at, pte, PDE_ACCESSED | (PDE_DIRTY if write else 0))

    def _pool(self, slot: int) -> int:
        if self._tables is None:
            self._tables = self.m.memory.alloc(POOL_TABLES * 0x1000, 0x1000)
        return self._tables + slot * 0x1000

    def _read_physical(self, address: int) -> bytes:
        try:
            return self.m.memory.read(address, 0x1000)
        except GuestFault:
            return bytes(0x1000)


def _filled(entry: int, force: int) -> int:
    """The shadow of a guest leaf entry that has been accessed: A and D set, so the CPU never writes it, and
    read-only until the guest's own dirty bit is set (its first write faults to the monitor)."""
    dirty = entry & PDE_DIRTY
    entry |= PDE_ACCESSED | PDE_DIRTY | force
    return entry if dirty else entry & ~PDE_WRITE


def _allowed(entry: int, user: bool, write: bool, wp: bool) -> bool:
    """Whether the guest's (combined) entry allows the access: U/S for a user access; R/W for a user write,
    or a supervisor write while CR0.WP is set."""
    if user and not entry & PDE_USER:
        return False
    return not write or bool(entry & PDE_WRITE) or (not user and not wp)


def _entry(memory, address: int) -> int | None:
    try:
        return struct.unpack("<I", memory.read(address, 4))[0]
    except GuestFault:
        return None


def _update(memory, address: int, entry: int, bits: int) -> None:
    if entry | bits != entry:
        memory.write(address, struct.pack("<I", entry | bits))
