"""Segment descriptors, gates and the TSS layout (SDM Vol. 3A §3.4.5, §6.11, §7.2.1): pure functions of bytes."""
from __future__ import annotations

import struct
from dataclasses import dataclass

# System descriptor types (S = 0).
TSS16_AVAILABLE, LDT, TSS16_BUSY, CALL_GATE16, TASK_GATE, INTR_GATE16, TRAP_GATE16 = 1, 2, 3, 4, 5, 6, 7
TSS32_AVAILABLE, TSS32_BUSY, CALL_GATE32, INTR_GATE32, TRAP_GATE32 = 9, 11, 12, 14, 15
INTERRUPT_GATES = frozenset({INTR_GATE16, INTR_GATE32})
IDT_GATES = frozenset({INTR_GATE16, TRAP_GATE16, INTR_GATE32, TRAP_GATE32})
TSS32 = frozenset({TSS32_AVAILABLE, TSS32_BUSY})

ACCESSED = 1 << 8          # in the high dword: type bit 0 of a code/data descriptor

# 32-bit TSS fields (SDM Vol. 3A Figure 7-2): ESPn at 4 + 8n, SSn at 8 + 8n; the I/O map base at 102.
TSS_MIN_LIMIT = 103
TSS_IOMAP_BASE = 102


def tss_stack_offsets(cpl: int) -> tuple[int, int]:
    """(ESP offset, SS offset) of the ring-``cpl`` stack in a 32-bit TSS."""
    assert 0 <= cpl <= 2, cpl
    return 4 + 8 * cpl, 8 + 8 * cpl


@dataclass(frozen=True)
class Descriptor:
    """One 8-byte GDT/LDT/IDT entry, decoded."""

    low: int
    high: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> Descriptor:
        low, high = struct.unpack("<II", raw)
        return cls(low, high)

    @property
    def type(self) -> int:
        return (self.high >> 8) & 0xF

    @property
    def system(self) -> bool:
        return not self.high & (1 << 12)

    @property
    def dpl(self) -> int:
        return (self.high >> 13) & 3

    @property
    def present(self) -> bool:
        return bool(self.high & (1 << 15))

    @property
    def base(self) -> int:
        return ((self.low >> 16) | ((self.high & 0xFF) << 16) | (self.high & 0xFF000000)) & 0xFFFFFFFF

    @property
    def limit(self) -> int:
        raw = (self.low & 0xFFFF) | (self.high & 0xF0000)
        return (raw << 12) | 0xFFF if self.high & (1 << 23) else raw

    @property
    def is_code(self) -> bool:
        return not self.system and bool(self.type & 8)

    @property
    def conforming(self) -> bool:
        return self.is_code and bool(self.type & 4)

    @property
    def writable_data(self) -> bool:
        return not self.system and not self.type & 8 and bool(self.type & 2)

    @property
    def big(self) -> bool:
        """D/B: a 32-bit code segment or a 32-bit stack."""
        return bool(self.high & (1 << 22))

    # Gates (IDT entries): selector and offset instead of base and limit.
    @property
    def selector(self) -> int:
        return self.low >> 16

    @property
    def offset(self) -> int:
        return (self.low & 0xFFFF) | (self.high & 0xFFFF0000)

    @property
    def gate_bits(self) -> int:
        return 32 if self.type & 8 else 16


def segment(base: int, limit: int, access: int, flags: int = 0xC) -> bytes:
    """Encode a code/data/system descriptor. ``limit`` is in units of the granularity in ``flags``."""
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       ((flags & 0xF) << 4) | ((limit >> 16) & 0xF), (base >> 24) & 0xFF)


# The machine's boot GDT (DESIGN §3.3): null, 0x08 code and 0x10 data, base 0, limit 4 GiB, DPL 0.
# The accessed bits are already set: the GDT lives in read-only monitor memory, and Unicorn writes that bit
# (from outside the emulation loop when a segment register is set through the API) if it is clear.
BOOT_CS, BOOT_DS = 0x08, 0x10
BOOT_GDT = bytes(8) + segment(0, 0xFFFFF, 0x9B) + segment(0, 0xFFFFF, 0x93)
