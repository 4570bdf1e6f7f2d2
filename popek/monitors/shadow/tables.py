"""The real descriptor tables and TSS a deprivileging monitor owns, derived from the guest's.

All of them live in monitor memory (read-only to the guest, DESIGN §3.3), allocated once at attach:

- **GDT** (64 KiB, real GDTR limit 0xFFFF): entry *i* is the guest's entry *i* with ring compression: a
  code or data descriptor, or a call gate, of DPL *d* gets DPL ``max(d, ring)``, and its accessed bit is
  set (the CPU cannot write it in read-only memory). The guest's TSS and LDT descriptors and task gates
  become null: the real CPU only ever uses the monitor's, which sit at the top of the table
  (``TSS_SELECTOR`` 0xFFF8, ``LDT_SELECTOR`` 0xFFF0); a guest GDT that reaches them loses those entries.
  Entries past the guest's limit are null, so a selector past it faults with the same error code.
  Rebuilt on lgdt; a write hook on the guest's GDT keeps each entry current when the guest edits it
  (the way VMware traced guest descriptor tables), so a guest never loads a stale descriptor.
- **LDT** (64 KiB): the same for the guest's LDT, loaded in the real LDTR through the monitor's own LDT
  descriptor when the guest has one (so ``sldt`` shows 0xFFF0 instead of the guest's selector).
- **IDT** (256 null gates): Unicorn never reads an IDT (REFERENCES): every event reaches the machine's hook
  and the monitor. It exists so that the real IDTR, which ``sidt`` reveals, points where a real monitor's
  would: into monitor memory.
- **TSS** (104 bytes, no I/O bitmap: every port traps): the real TR. For ring 1 or 2 its ring-``ring``
  stack is the guest's ring-0 stack (copied at ltr and whenever the guest writes its TSS), which Unicorn
  uses for a call through a call gate into the guest kernel.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import unicorn

from popek.machine.descriptors import ACCESSED, segment
from popek.machine.faults import GuestFault
from popek.machine.memory import CR0_PG

if TYPE_CHECKING:
    from popek.machine.machine import Machine
    from popek.monitors.vcpu import VCpu

TABLE_SIZE = 0x10000
PRESENT = 1 << 15                   # in a descriptor's high dword, and in Unicorn's descriptor caches
TSS_SELECTOR, LDT_SELECTOR = 0xFFF8, 0xFFF0
TSS_LIMIT = 103
CALL_GATES = (4, 12)


def compress(raw: bytes, ring: int) -> bytes:
    """One guest descriptor as the real CPU gets it (see the module docstring)."""
    low, high = struct.unpack("<II", raw)
    code_or_data = high & (1 << 12)
    if not code_or_data and (high >> 8) & 0xF not in CALL_GATES:
        return bytes(8)
    dpl = (high >> 13) & 3
    if dpl < ring:
        high = (high & ~(3 << 13)) | (ring << 13)
    if code_or_data:
        high |= ACCESSED
    return struct.pack("<II", low, high)


class ShadowTables:
    """The real GDT, LDT, IDT and TSS (module docstring), kept in step with the guest's."""

    trace_gdt = True        # follow guest stores into its GDT (pv: the GDT frames are read-only instead)

    def __init__(self, machine: Machine, vcpu: VCpu):
        self.m, self.v = machine, vcpu
        memory = machine.memory
        self.gdt = memory.alloc(TABLE_SIZE, 8)
        self.ldt = memory.alloc(TABLE_SIZE, 8)
        self.idt = memory.alloc(256 * 8, 8)
        self.tss = memory.alloc(TSS_LIMIT + 1, 16)
        self._hooks: dict[str, int] = {}            # table name -> write hook handle
        self.edits = 0                              # guest writes into its GDT/LDT/TSS seen by the hooks
        # TSS: I/O map base past the limit (no bitmap: every port traps). Its descriptor is busy.
        tss = bytearray(TSS_LIMIT + 1)
        struct.pack_into("<H", tss, 102, TSS_LIMIT + 1)
        memory.monitor_write(self.tss, bytes(tss))
        self._monitor_entry(TSS_SELECTOR, segment(self.tss, TSS_LIMIT, 0x8B, 0))
        memory.monitor_write(self.idt, bytes(256 * 8))
        self.gdt_changed()
        self.ldt_changed()
        machine.set_table("idtr", self.idt, 256 * 8 - 1)
        machine.set_table("tr", self.tss, TSS_LIMIT, TSS_SELECTOR, PRESENT | 0x9 << 8)    # 32-bit TSS, as ltr caches it

    # --- descriptor tables ----------------------------------------------------------------------------
    def _monitor_entry(self, selector: int, raw: bytes) -> None:
        self.m.memory.monitor_write(self.gdt + selector, raw)

    def _copy(self, shadow: int, base: int, limit: int) -> None:
        """Compress the guest table at linear ``base`` (``limit`` + 1 bytes) into ``shadow``."""
        size = min(limit + 1, TABLE_SIZE) & ~7
        space = self.v.space(self.m, mark=False)
        try:
            raw = space.read(base, size) if size else b""
        except GuestFault:
            raw = b"".join(self._read_or_null(space, base + i) for i in range(0, size, 8))
        table = b"".join(compress(raw[i:i + 8], self.v.ring) for i in range(0, size, 8))
        top = LDT_SELECTOR if shadow == self.gdt else TABLE_SIZE
        self.m.memory.monitor_write(shadow, table[:top] + bytes(top - min(top, len(table))))

    @staticmethod
    def _read_or_null(space, at: int) -> bytes:
        try:
            return space.read(at, 8)
        except GuestFault:
            return bytes(8)

    def gdt_changed(self) -> None:
        base, limit = self.v.gdtr
        self._copy(self.gdt, base, limit)
        self.m.set_table("gdtr", self.gdt, TABLE_SIZE - 1)
        if self.trace_gdt:
            self._trace("gdt", base, limit, self.gdt)
        else:
            self._untrace("gdt")

    def ldt_changed(self) -> None:
        selector, base, limit = self.v.ldtr
        if selector & 0xFFFC == 0:
            self._untrace("ldt")
            self.m.set_table("ldtr", 0, 0, 0)
            return
        self._copy(self.ldt, base, limit)
        self._monitor_entry(LDT_SELECTOR, segment(self.ldt, limit, 0x82, 0))
        self.m.set_table("ldtr", self.ldt, limit, LDT_SELECTOR, PRESENT | 0x2 << 8)
        self._trace("ldt", base, limit, self.ldt)

    def tss_changed(self) -> None:
        """The guest's ring-0 stack becomes the real TSS's ring-``ring`` stack (for call gates)."""
        ring = self.v.ring
        _selector, base, limit = self.v.tr
        if ring in (1, 2) and limit >= 9:
            try:
                esp, ss = struct.unpack("<IH", self.v.space(self.m, mark=False).read(base + 4, 6))
            except GuestFault:
                return
            self.m.memory.monitor_write(self.tss + 4 + 8 * ring, struct.pack("<II", esp, (ss & 0xFFFC) | ring))
            self._trace("tss", base + 4, 5, None)

    def _trace(self, name: str, base: int, limit: int, shadow: int | None) -> None:
        """Follow guest stores into [base, base + limit] (linear) with a scoped write hook. Not a table in
        monitor memory (the boot GDT): the guest cannot store there, and the hook would see the attempt."""
        self._untrace(name)
        if not self.v.cr0 & CR0_PG and not self.m.memory.in_ram(base, 1):
            return
        self._hooks[name] = self.m.uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, self._on_write, (base, shadow),
                                               base, base + limit)

    def _untrace(self, name: str) -> None:
        handle = self._hooks.pop(name, None)
        if handle is not None:
            self.m.uc.hook_del(handle)

    def _on_write(self, uc, access: int, address: int, size: int, value: int, target) -> None:
        # Called before the store lands: the new contents are memory plus the stored bytes.
        base, shadow = target
        self.edits += 1
        step = 8 if shadow is not None else 6       # whole descriptors; the TSS's ESP0:SS0
        first = (address - base) // step * step if shadow is not None else 0
        last = (address + size - 1 - base) // step * step if shadow is not None else 0
        try:
            raw = bytearray(self.v.space(self.m, mark=False).read(base + first, last - first + step))
        except GuestFault:
            return
        for i in range(size):
            at = address + i - base - first
            if 0 <= at < len(raw):
                raw[at] = (value >> (8 * i)) & 0xFF
        if shadow is None:
            esp, ss = struct.unpack("<IH", raw)
            ring = self.v.ring
            self.m.memory.monitor_write(self.tss + 4 + 8 * ring, struct.pack("<II", esp, (ss & 0xFFFC) | ring))
            return
        limit = LDT_SELECTOR if shadow == self.gdt else TABLE_SIZE
        for i in range(0, len(raw), 8):
            if first + i < limit:
                self.m.memory.monitor_write(shadow + first + i, compress(bytes(raw[i:i + 8]), self.v.ring))
        self.v.changed("descriptors")
