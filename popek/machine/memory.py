"""Guest RAM, monitor memory, and the bounds-checked accessors the machine and monitors read them through.

Physical layout (DESIGN §3.3):

    0 .. ram_size                      guest RAM, read/write/execute
    ram_size .. ram_size + 1 MiB       monitor memory: mapped read-only for the guest (descriptor tables
                                       must stay readable by the CPU), written only by the host. The boot
                                       GDT is its first 24 bytes; monitors allocate shadow tables after it.
    everything else                    unmapped: a guest access is a #GP(0) delivered to the guest

Measured on unicorn 2.1.4: descriptor loads from a read-only GDT work as long as the descriptor's accessed
bit is already set (the CPU writes it otherwise, and that write faults). So every descriptor a monitor puts
in monitor memory must have it set; ``ltr`` always writes the busy bit, so a monitor loads TR from a TSS
descriptor there with ``Machine.set_table`` instead. A guest store there is a Unicorn write-protection
error, which the machine turns into #GP(0) for the guest.

Unicorn's ``mem_write`` ignores page protections, so host writes on the guest's behalf (an exception frame
pushed by the machine) go through ``write``, which only accepts RAM; ``monitor_write`` is the one way into
monitor memory. Monitor memory is a host buffer mapped with ``uc_mem_map_ptr``, and ``monitor_write``
copies into it directly: a ``uc_mem_write`` to a read-only region from inside a memory hook (a monitor
following guest stores into its descriptor tables) crashes Unicorn 2.1.4 (measured). Reads through ``read`` accept RAM and monitor memory and raise ``GuestFault`` elsewhere,
like xv6's ``fetchint``: a guest-supplied address is checked at the boundary, never trusted.

With CR0.PG set, ``linear`` walks the guest's 32-bit page tables (4 KiB pages, and 4 MiB pages under
CR4.PSE) as a supervisor access; the accessed and dirty bits are not updated.
"""
from __future__ import annotations

import ctypes
import struct

import unicorn
from unicorn.unicorn_py3.unicorn import uclib

from popek.machine.descriptors import Descriptor
from popek.machine.faults import GP, PF, GuestFault
from popek.machine.result import PAGE_SIZE, RamImage, page_digest

MIB = 1 << 20
RAM_DEFAULT = 32 * MIB
RAM_MAX = 3072 * MIB            # monitor memory must fit below 4 GiB
MONITOR_SIZE = 1 * MIB
PAGE = 0x1000

_IMAGE_BLOCK = 0x40000          # Memory.image reads RAM in blocks of 256 KiB (fastest measured)
_ZERO_BLOCK = bytes(_IMAGE_BLOCK)
_ZERO_PAGE = bytes(PAGE)
assert PAGE == PAGE_SIZE

CR0_PG = 1 << 31
CR0_WP = 1 << 16
CR4_PSE = 1 << 4


class Memory:
    """Guest RAM and monitor memory of one machine."""

    def __init__(self, uc: unicorn.Uc, ram_size: int = RAM_DEFAULT):
        assert ram_size % PAGE == 0 and 0 < ram_size <= RAM_MAX, ram_size
        self.uc = uc
        self.ram_size = ram_size
        self.monitor_base = ram_size
        self.monitor_end = ram_size + MONITOR_SIZE
        self._monitor_next = self.monitor_base
        self._uch = uc._uch
        self._buf = ctypes.create_string_buffer(64)     # raw uc_mem_read: 0.4 µs against the binding's 1.1
        uc.mem_map(0, ram_size, unicorn.UC_PROT_ALL)
        # Called with (physical address, size) after every host write into guest RAM: Unicorn does not see
        # host writes, and a monitor that keeps translations of guest code must drop the stale ones.
        self.on_write = None
        # Called after a walk on the guest's behalf set accessed/dirty bits in the guest's page tables
        # (``marked`` counts those entries): shadow paging refills the shadow entries they open.
        self.on_mark = None
        self.marked = 0
        self.runs_ram = True                # Unicorn executes guest RAM (False: only a monitor's own code)
        self._monitor = ctypes.create_string_buffer(MONITOR_SIZE)     # kept alive as long as the mapping
        uc.mem_map_ptr(self.monitor_base, MONITOR_SIZE, unicorn.UC_PROT_READ, ctypes.addressof(self._monitor))

    # --- physical ---------------------------------------------------------------------------------------
    def in_ram(self, address: int, size: int) -> bool:
        return 0 <= address and address + size <= self.ram_size

    def readable(self, address: int, size: int) -> bool:
        return 0 <= address and address + size <= self.monitor_end

    def read(self, address: int, size: int) -> bytes:
        """Physical read of RAM or monitor memory; anything else is #GP(0) for the guest."""
        if not self.readable(address, size):
            raise GuestFault(GP, 0, f"read of {size} bytes at {address:#x} outside memory")
        if size > len(self._buf):
            return bytes(self.uc.mem_read(address, size))
        if uclib.uc_mem_read(self._uch, address, self._buf, size):
            raise RuntimeError(f"uc_mem_read({address:#x}, {size}) failed inside mapped memory")
        return ctypes.string_at(self._buf, size)

    def write(self, address: int, data: bytes) -> None:
        """Physical write on the guest's behalf: RAM only (monitor memory is never the guest's)."""
        if not self.in_ram(address, len(data)):
            raise GuestFault(GP, 0, f"write of {len(data)} bytes at {address:#x} outside guest RAM")
        self.uc.mem_write(address, bytes(data))
        if self.on_write is not None:
            self.on_write(address, len(data))

    def image(self) -> RamImage:
        """Guest RAM as it is now, page by page (``RamImage``): 3 ms for 32 MiB of mostly untouched RAM.
        Read in blocks straight from Unicorn; a block of zeros is skipped as a whole."""
        buf = ctypes.create_string_buffer(_IMAGE_BLOCK)
        digests: dict[int, str] = {}
        contents: dict[int, bytes] = {}
        for base in range(0, self.ram_size, _IMAGE_BLOCK):
            size = min(_IMAGE_BLOCK, self.ram_size - base)
            if uclib.uc_mem_read(self._uch, base, buf, size):
                raise RuntimeError(f"uc_mem_read({base:#x}, {size}) failed inside guest RAM")
            block = buf.raw[:size]
            if block == _ZERO_BLOCK[:size]:
                continue
            for offset in range(0, size, PAGE):
                page = block[offset:offset + PAGE]
                if page != _ZERO_PAGE:
                    digests[base + offset] = page_digest(page)
                    contents[base + offset] = page
        return RamImage(self.ram_size, digests, contents)

    def monitor_write(self, address: int, data: bytes) -> None:
        """Host write into monitor memory (boot GDT, shadow tables)."""
        assert self.monitor_base <= address and address + len(data) <= self.monitor_end, hex(address)
        ctypes.memmove(ctypes.addressof(self._monitor) + address - self.monitor_base, bytes(data), len(data))

    def alloc(self, size: int, align: int = 16) -> int:
        """Reserve ``size`` bytes of monitor memory (never freed: monitors allocate at attach time)."""
        start = (self._monitor_next + align - 1) & ~(align - 1)
        if start + size > self.monitor_end:
            raise MemoryError(f"monitor memory exhausted ({size} bytes asked)")
        self._monitor_next = start + size
        return start

    def u8(self, address: int) -> int:
        return self.read(address, 1)[0]

    def u16(self, address: int) -> int:
        return struct.unpack("<H", self.read(address, 2))[0]

    def u32(self, address: int) -> int:
        return struct.unpack("<I", self.read(address, 4))[0]

    # --- linear -----------------------------------------------------------------------------------------
    def space(self, cr0: int, cr3: int, cr4: int, gdtr: tuple[int, int], ldtr: tuple[int, int]) -> AddressSpace:
        return AddressSpace(self, cr0, cr3, cr4, gdtr, ldtr)

    def linear(self, address: int, size: int, cr0: int, cr3: int, cr4: int, write: bool = False,
               mark: bool = False) -> int:
        """The physical address of ``size`` bytes at linear ``address`` (a supervisor access).

        Raises ``GuestFault(#PF)`` (with ``address`` set, for CR2) when a page is missing or, under CR0.WP,
        read-only for a write. An access that crosses a page boundary must map to contiguous frames, which
        is all the machine needs for descriptors and the few words of an exception frame.
        """
        address &= 0xFFFFFFFF
        if not cr0 & CR0_PG:
            return address
        marked = self.marked
        first = self._walk(address, cr0, cr3, cr4, write, mark)
        last = self._walk((address + size - 1) & 0xFFFFFFFF, cr0, cr3, cr4, write, mark)
        if self.marked != marked and self.on_mark is not None:
            self.on_mark()
        if last - first != size - 1:
            raise GuestFault(PF, 0b10 if write else 0, f"access at {address:#x} spans discontiguous pages",
                             address=(address + size - 1) & ~(PAGE - 1))
        return first

    def _walk(self, address: int, cr0: int, cr3: int, cr4: int, write: bool, mark: bool) -> int:
        """A page walk as the CPU does it; ``mark``: an access on the guest's behalf, which sets the accessed
        bits of the entries it used and, for a write, the dirty bit of the page, as the CPU's would."""
        code = 0b10 if write else 0
        pde_at = (cr3 & ~0xFFF) + (address >> 22) * 4
        pde = self.u32(pde_at)
        if not pde & 1:
            raise GuestFault(PF, code, f"page directory entry for {address:#x} not present", address=address)
        if pde & 0x80 and cr4 & CR4_PSE:
            if write and cr0 & CR0_WP and not pde & 2:
                raise GuestFault(PF, code | 1, f"write to read-only page {address:#x}", address=address)
            if mark:
                self._mark(pde_at, pde, ACCESSED | (DIRTY if write else 0))
            return (pde & 0xFFC00000) | (address & 0x3FFFFF)
        pte_at = (pde & ~0xFFF) + ((address >> 12) & 0x3FF) * 4
        pte = self.u32(pte_at)
        if not pte & 1:
            raise GuestFault(PF, code, f"page table entry for {address:#x} not present", address=address)
        if write and cr0 & CR0_WP and not (pte & pde & 2):
            raise GuestFault(PF, code | 1, f"write to read-only page {address:#x}", address=address)
        if mark:
            self._mark(pde_at, pde, ACCESSED)
            self._mark(pte_at, pte, ACCESSED | (DIRTY if write else 0))
        return (pte & ~0xFFF) | (address & 0xFFF)

    def _mark(self, address: int, entry: int, bits: int) -> None:
        if entry | bits != entry and self.in_ram(address, 4):
            self.write(address, struct.pack("<I", entry | bits))
            self.marked += 1


ACCESSED, DIRTY = 0x20, 0x40           # page-table entry bits the CPU sets


class AddressSpace:
    """Linear addresses and selectors as the CPU resolves them at one moment: paging from CR0/CR3/CR4 and
    the descriptor tables from GDTR/LDTR ((base, limit) pairs). Built once per delivery or emulation, so
    the registers are read once."""

    __slots__ = ("memory", "cr0", "cr3", "cr4", "gdtr", "ldtr", "mark")

    def __init__(self, memory: Memory, cr0: int, cr3: int, cr4: int, gdtr: tuple[int, int],
                 ldtr: tuple[int, int], mark: bool = True):
        """``mark``: accesses on the guest's behalf, which set accessed/dirty bits as the CPU's do (False: a
        monitor looking at guest memory for itself, e.g. a translator reading code ahead)."""
        self.memory, self.cr0, self.cr3, self.cr4, self.gdtr, self.ldtr = memory, cr0, cr3, cr4, gdtr, ldtr
        self.mark = mark

    def physical(self, linear: int, size: int, write: bool = False) -> int:
        if not self.cr0 & CR0_PG:
            return linear & 0xFFFFFFFF
        return self.memory.linear(linear, size, self.cr0, self.cr3, self.cr4, write, self.mark)

    def read(self, linear: int, size: int) -> bytes:
        return self.memory.read(self.physical(linear, size), size)

    def write(self, linear: int, data: bytes, fault: tuple[int, int] = (GP, 0)) -> None:
        """Write on the guest's behalf; a target outside RAM raises ``fault`` (vector, error code)."""
        physical = self.physical(linear, len(data), True)
        if not self.memory.in_ram(physical, len(data)):
            raise GuestFault(fault[0], fault[1], f"write at {linear:#x} outside guest RAM")
        self.memory.write(physical, data)
        # Unicorn notices guest stores into translated code, not host writes from a hook: a frame pushed
        # onto a stack that overlaps code must drop that code's translations (REFERENCES). 1.5-3 µs; not
        # needed when Unicorn never runs guest RAM itself (a binary translator's guest: Memory.runs_ram).
        if self.memory.runs_ram:
            self.memory.uc.ctl_remove_cache(linear, linear + len(data))

    def descriptor_address(self, selector: int, vector: int, error_code: int) -> int:
        """Linear address of the GDT/LDT entry of ``selector``; ``GuestFault(vector, error_code)`` past the
        table limit."""
        base, limit = self.ldtr if selector & 4 else self.gdtr
        index = selector & 0xFFF8
        if index + 7 > limit:
            raise GuestFault(vector, error_code, f"selector {selector:#x} beyond the table limit {limit:#x}")
        return base + index

    def descriptor(self, selector: int, vector: int, error_code: int) -> Descriptor:
        address = self.descriptor_address(selector, vector, error_code)
        try:
            return Descriptor.from_bytes(self.read(address, 8))
        except GuestFault as fault:
            if fault.vector == PF:              # the table is paged out: the walk's #PF, as the CPU raises it
                raise
            raise GuestFault(vector, error_code, fault.why) from None
