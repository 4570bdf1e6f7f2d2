"""The sun4v hypervisor API as data: trap numbers, fast-trap function numbers, status codes, the register
mapping onto popek's x86 machine, and what belongs to the domain (docs/sun4v.md is the guest's contract).

Numbers are the sun4v API's (Linux arch/sparc/include/asm/hypervisor.h, the UltraSPARC Hypervisor API
specification). Nothing here touches a machine; ``popek.monitors.sun4v.monitor`` does the work.
"""
from __future__ import annotations

# --- traps ----------------------------------------------------------------------------------------------
FAST_TRAP = 0x80                    # ta 0x80: the function number in %o5
MMU_MAP_ADDR_TRAP, MMU_UNMAP_ADDR_TRAP = 0x83, 0x84
HYPERVISOR_TRAPS = 0x80             # int n with n >= this, at CPL 0, enters the hypervisor (ta n, n >= 0x80)

# sun4v's %o0..%o5 on the x86 machine: %o5 carries the function number, %o0 the status on return.
O_REGS = ("ebx", "ecx", "edx", "esi", "edi", "ebp")

# --- status codes (HV_E*) ---------------------------------------------------------------------------------
EOK, ENOCPU, ENORADDR, EINVAL, EBADTRAP, EBADALIGN = 0, 1, 2, 6, 7, 8
EWOULDBLOCK, ENOACCESS, ENOTSUPPORTED, ECHANNEL = 9, 10, 13, 16
STATUS_NAMES = {EOK: "EOK", ENOCPU: "ENOCPU", ENORADDR: "ENORADDR", EINVAL: "EINVAL", EBADTRAP: "EBADTRAP",
                EBADALIGN: "EBADALIGN", EWOULDBLOCK: "EWOULDBLOCK", ENOACCESS: "ENOACCESS",
                ENOTSUPPORTED: "ENOTSUPPORTED", ECHANNEL: "ECHANNEL"}

# --- fast-trap functions (HV_FAST_*): number -> name (the names are popek.events.SUN4V_FUNCTIONS) --------
FUNCTIONS = {
    0x00: "mach_exit", 0x01: "mach_desc", 0x12: "cpu_yield", 0x16: "cpu_myid", 0x50: "tod_get",
    0x60: "cons_getchar", 0x61: "cons_putchar", 0x63: "cons_write",
    0xE0: "ldc_tx_qconf", 0xE1: "ldc_tx_qinfo", 0xE2: "ldc_tx_get_state", 0xE3: "ldc_tx_set_qtail",
    0xE4: "ldc_rx_qconf", 0xE5: "ldc_rx_qinfo", 0xE6: "ldc_rx_get_state", 0xE7: "ldc_rx_set_qhead",
}
HYPER_FAST = {MMU_MAP_ADDR_TRAP: "mmu_map_addr", MMU_UNMAP_ADDR_TRAP: "mmu_unmap_addr"}
BAD_TRAP = "bad-trap"               # the event name of a call that gets EBADTRAP

# --- Logical Domain Channels --------------------------------------------------------------------------
QUEUE_ENTRY = 64                    # bytes per queue entry
CHANNEL_DOWN, CHANNEL_UP, CHANNEL_RESETTING = 0, 1, 2

# --- time ----------------------------------------------------------------------------------------------
# tod_get: a fixed epoch (2005-11-14 00:00:00 UTC, the UltraSPARC T1's announcement; any fixed value keeps
# runs deterministic) plus system time, the machine's clock at the PIT's 1,193,182 Hz (one clock per guest
# instruction, popek.machine.devices).
TOD_EPOCH = 1_131_926_400
CLOCK_HZ = 1_193_182

# --- what is whose ---------------------------------------------------------------------------------------
# The strand-local timer and interrupt controller: the guest's own (privileged, no trap).
STRAND_PORTS = frozenset(range(0x20, 0x22)) | frozenset(range(0xA0, 0xA2)) | frozenset(range(0x40, 0x44))
CONSOLE_PORTS = frozenset(range(0x3F8, 0x400))
EXIT_PORT = 0xF4
PORT_IO = frozenset({"in", "out", "ins", "outs"})
MEMORY = "memory"                   # the hypertrap name of an access beyond the domain's real addresses

# What a sun4v kernel does instead of touching hyperprivileged state (the note of an unported guest).
CONSOLE_INSTEAD = ("the console is the hypervisor's: a sun4v kernel calls cons_putchar (%o5 = 0x61) or "
                   "cons_write (0x63), and cons_getchar (0x60) to read")
EXIT_INSTEAD = "the exit port is the hypervisor's: a sun4v kernel calls mach_exit (%o5 = 0x00)"
DEVICE_INSTEAD = ("no device port is the domain's but its strand's timer and interrupt controller: a sun4v "
                  "domain reaches other devices through LDC channels (0xe0-0xe7)")
INSTEAD = {
    "rdmsr": "MSRs are hyperprivileged registers: no hypervisor call hands them to a domain",
    "wrmsr": "MSRs are hyperprivileged registers: no hypervisor call hands them to a domain",
    "sysenter": "sysenter enters the code hyperprivileged MSRs name: a sun4v kernel's system calls are int n "
                "below 0x80, as ta below 0x80",
    "syscall": "syscall enters the code hyperprivileged MSRs name: a sun4v kernel's system calls are int n "
               "below 0x80, as ta below 0x80",
    "wbinvd": "machine-wide cache flushes are the hypervisor's",
    "invd": "machine-wide cache flushes are the hypervisor's",
    "wbnoinvd": "machine-wide cache flushes are the hypervisor's",
    MEMORY: "real addresses beyond the domain's memory belong to the hypervisor and the other domains",
}


def port_instead(ports: range) -> str:
    """What a sun4v kernel does instead of an access to ``ports``."""
    if any(p in CONSOLE_PORTS for p in ports):
        return CONSOLE_INSTEAD
    if EXIT_PORT in ports:
        return EXIT_INSTEAD
    return DEVICE_INSTEAD


def parse_size(text: str) -> int:
    """A memory size as ``ldm set-memory`` takes it: bytes, or a number with a K, M or G suffix (binary
    units). ValueError for anything else."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip()
    scale = units.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit():
        raise ValueError(f"not a size: {text!r} (a number with a K, M or G suffix, e.g. \"32M\")")
    return int(digits) * scale
