"""Xen's 32-bit PV ABI as data: hypercall numbers, errno values, structure layouts, the boot pages, and the
descriptor validation ``set_gdt`` and ``update_descriptor`` apply (docs/pv.md; numbers and offsets from
xen/include/public/xen.h, sched.h, event_channel.h, vcpu.h and arch-x86/xen-x86_32.h).

Nothing here touches a machine except through the two page builders; the monitor (``popek.monitors.pv``)
does the work.
"""
from __future__ import annotations

import struct

from popek.machine.descriptors import Descriptor, segment

# --- numbers --------------------------------------------------------------------------------------------
# Hypercall numbers (xen.h, __HYPERVISOR_*). The names are popek.events.XEN_HYPERCALLS.
HYPERCALL_NAMES = {
    0: "set_trap_table", 1: "mmu_update", 2: "set_gdt", 3: "stack_switch", 4: "set_callbacks",
    5: "fpu_taskswitch", 6: "sched_op_compat", 10: "update_descriptor", 12: "memory_op", 13: "multicall",
    14: "update_va_mapping", 15: "set_timer_op", 17: "xen_version", 18: "console_io", 21: "vm_assist",
    23: "iret", 24: "vcpu_op", 26: "mmuext_op", 29: "sched_op", 32: "event_channel_op", 34: "hvm_op",
}
HYPERCALL_VECTOR = 0x82
MULTICALL = 13

# Negative errno values returned in EAX (Linux/Xen errno numbering).
EPERM, ENOENT, EFAULT, EEXIST, EINVAL, ENOSYS = 1, 2, 14, 17, 22, 38

# Xen's flat segments (xen-x86_32.h); they live in the reserved top of the GDT, above the guest's part.
FLAT_RING1_CS, FLAT_RING1_DS, FLAT_RING3_CS, FLAT_RING3_DS = 0xE019, 0xE021, 0xE02B, 0xE033
FIRST_RESERVED_GDT_ENTRY = 14 * 512                  # the guest's GDT is at most 14 pages (7168 entries)
RESERVED = {                                          # selector -> descriptor (accessed bit set)
    FLAT_RING1_CS: segment(0, 0xFFFFF, 0xBB), FLAT_RING1_DS: segment(0, 0xFFFFF, 0xB3),
    FLAT_RING3_CS: segment(0, 0xFFFFF, 0xFB), FLAT_RING3_DS: segment(0, 0xFFFFF, 0xF3),
}
KERNEL_RING = 1

# Boot state.
BOOT_ESP, BOOT_EFLAGS = 0x00090000, 0x202
START_INFO_FROM_TOP, SHARED_INFO_FROM_TOP = 0x2000, 0x1000
MAGIC = b"xen-3.0-x86_32"
XENVER_VERSION = 4 << 16 | 17                        # Xen 4.17

# start_info (x86_32) offsets.
SI_NR_PAGES, SI_SHARED_INFO, SI_CMD_LINE, CMD_LINE_SIZE = 32, 36, 80, 1024
# shared_info offsets: vcpu_info[0] and the event channel bitmaps.
VCPU_PENDING, VCPU_MASK, VCPU_PENDING_SEL, VCPU_CR2 = 0, 1, 4, 8
TIME_VERSION, TIME_TSC, TIME_SYSTEM, TIME_MUL, TIME_SHIFT = 32, 40, 48, 56, 60
EVTCHN_PENDING, EVTCHN_MASK = 2048, 2176
NR_PORTS = 32 * 32

# trap_info_t {u8 vector; u8 flags; u16 cs; u32 address}; flags & 3 = DPL, flags & 4 = mask events.
TRAP_INFO = struct.Struct("<BBHI")
TI_DPL, TI_MASK_EVENTS = 3, 4
# multicall_entry_t {u32 op; u32 result; u32 args[6]}.
MULTICALL_ENTRY = struct.Struct("<II6I")

# sched_op, event_channel_op, console_io, xen_version commands.
SCHEDOP_YIELD, SCHEDOP_BLOCK, SCHEDOP_SHUTDOWN = 0, 1, 2
EVTCHNOP_BIND_VIRQ, EVTCHNOP_SEND, EVTCHNOP_UNMASK = 1, 4, 9
VIRQ_TIMER = 0
CONSOLEIO_WRITE, CONSOLEIO_READ = 0, 1

# The ports a domain is granted (COM1 and the exit port), like a domain given those I/O ports.
GRANTED_PORTS = frozenset(range(0x3F8, 0x400)) | {0xF4}

CALL_GATE = 0xC


def start_info(ram_size: int, cmdline: bytes = b"") -> bytes:
    """The start_info page: magic, nr_pages, the shared_info address, the command line; the rest 0."""
    page = bytearray(4096)
    page[0:len(MAGIC)] = MAGIC
    struct.pack_into("<II", page, SI_NR_PAGES, ram_size // 4096, ram_size - SHARED_INFO_FROM_TOP)
    line = cmdline[:CMD_LINE_SIZE - 1]
    page[SI_CMD_LINE:SI_CMD_LINE + len(line)] = line
    return bytes(page)


def shared_info() -> bytes:
    """The shared_info page at boot: zeroed but vCPU 0's evtchn_upcall_mask = 1; the time scale is one
    nanosecond per TSC unit (mul 2^31, shift 1)."""
    page = bytearray(4096)
    page[VCPU_MASK] = 1
    struct.pack_into("<Ib", page, TIME_MUL, 1 << 31, 1)
    return bytes(page)


def descriptor_ok(raw: bytes, in_guest_gdt=lambda selector: False) -> str | None:
    """Why the descriptor ``raw`` may not go into a PV guest's GDT, or None (Xen's check_descriptor, as
    docs/pv.md states it: code/data of DPL >= 1; among system descriptors only call gates, to a code
    segment that is not ring 0). ``in_guest_gdt(selector)`` says whether a call gate's target is one of
    the guest's own (validated) code descriptors."""
    d = Descriptor.from_bytes(raw)
    if not d.present:
        return None                                  # a not-present descriptor always faults: harmless
    if not d.system:
        return None if d.dpl >= KERNEL_RING else f"DPL {d.dpl} {'code' if d.is_code else 'data'} segment"
    if d.type != CALL_GATE:
        return f"system descriptor of type {d.type:#x}"
    target = d.selector
    if target & 0xFFFC in (FLAT_RING1_CS & 0xFFFC, FLAT_RING3_CS & 0xFFFC) or in_guest_gdt(target):
        return None
    return f"call gate to {target:#x}, which is not a non-ring-0 code segment of the guest"
