"""I/O permission (SDM Vol. 1 §19.5), which Unicorn does not check: IN, OUT, INS and OUTS at CPL > IOPL are
allowed only when every bit for the accessed ports is clear in the I/O permission bitmap of the current
32-bit TSS. No TSS, a 16-bit TSS, a bitmap offset past the TSS limit or a bitmap byte past it: denied."""
from __future__ import annotations

import struct

from popek.machine.descriptors import TSS32, TSS_IOMAP_BASE, TSS_MIN_LIMIT
from popek.machine.faults import GP, GuestFault
from popek.machine.memory import AddressSpace


def bitmap_allows(space: AddressSpace, tr: tuple[int, int, int], port: int, size: int) -> bool:
    """``tr`` is (selector, base, limit) of the task register."""
    selector, base, limit = tr
    if selector & 0xFFFC == 0 or limit < TSS_MIN_LIMIT:
        return False
    try:
        if space.descriptor(selector, GP, 0).type not in TSS32:
            return False
        bitmap = base + struct.unpack("<H", space.read(base + TSS_IOMAP_BASE, 2))[0]
        first, last = bitmap + port // 8, bitmap + (port + size - 1) // 8
        if last - base > limit:
            return False
        bits = int.from_bytes(space.read(first, last - first + 1), "little")
    except GuestFault:
        return False
    return (bits >> (port % 8)) & ((1 << size) - 1) == 0
