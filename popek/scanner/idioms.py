"""VM-detection idioms, recognised in context (REFERENCES: "VM-detection idioms used by real programs").

A lone SIDT or CPUID says little; what makes it VM detection is what the code does around it. For each scanner
finding (a *site*) we decode a small window and run a tiny data-flow over it — not an emulator:

- from up to BACK_BYTES before the site, decoded forward until it lands exactly on the site (x86 decoding
  resynchronises within a few instructions), constants are tracked in registers and memory: the magic values
  a program sets up (EAX = 'VMXh', DX = 'VX', EAX = CPUID leaf, a buffer filled with 0xDEADBEEF);
- the site's result becomes a Taint ("bits lo.. of field F are at bit 0 here"), followed through moves, loads,
  stores, shifts, AND, push/pop for up to FORWARD instructions; each cmp/sub/test/bt/and of a tainted value
  with a constant is an event.

An idiom is a row of IDIOMS: trigger canonical names, constants required before the site, and checks on the
events. Limits (on purpose): no branch is followed (conditional jumps fall through, jmp/ret end the window),
a call clobbers the caller-saved registers, memory is keyed by the address expression text, and a register
write forgets memory addressed through that register.

Decisions: a CPUID of a hypervisor leaf (0x40000000-0x4FFFFFFF) with a vendor-string piece compared is
``cpuid-vendor``; the leaf alone is the weaker ``cpuid-hv-leaf`` (only a hypervisor answers it, but the code
may merely log the answer). ``sldt-sentinel`` needs the comparison with 0xDEAD0000/0xDEADBEEF, not the
pre-fill (which a compiler may hoist out of the window). ``redpill``/``dtbase-ff`` look at bits 24..31 of the
stored base in every mode, as the original 32-bit checks do.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, replace

from popek.decode import BAD, sweep

BACK_BYTES = 64   # how far before a site the set-up of magic values is looked for
FORWARD = 12      # instructions after a site searched for the comparison: compilers put it right after the load
# A timing check has the timed instructions and the second read between the site and the subtraction.
FORWARD_FOR = {"rdtsc": 32}


# ------------------------------------------------------------------------------------------ values

@dataclass(frozen=True)
class Const:
    value: int
    mask: int        # which bits are known (a write to DX leaves the rest of EDX unknown)


@dataclass(frozen=True)
class Taint:
    field: str       # what the site produced: "base", "limit", "ldtr", "tr", "msw", "ecx", ...
    lo: int          # field bit found at bit 0 of this value (shr adds, shl subtracts)
    width: int       # field width in bits


@dataclass(frozen=True)
class Addr:
    """The address of a memory cell: what ``lea r, [m]`` or ``mov r, esp`` puts in a register, so that a later
    ``[r + d]`` is the same cell as ``[m + d]`` (compilers at -O0 read a stored descriptor back through a pointer,
    and pass a register block to a helper by its address)."""
    key: tuple
    disp: int
    part: int = 0    # byte ``part`` of the pointer, as stored in one memory cell


@dataclass(frozen=True)
class Event:
    kind: str        # "cmp" (against a constant) or "test" (test/and/bt, or cmp with 0)
    taint: Taint
    const: int       # the constant (cmp) or the mask (test), at the operand size
    bits: int        # operand size in bits


def _sh(x: int, n: int) -> int:
    return x << n if n >= 0 else x >> -n


def _field_view(ev: Event) -> tuple[int, int]:
    """(constant, compared window), both in the field's bit positions."""
    fmask = (1 << ev.taint.width) - 1
    return _sh(ev.const, ev.taint.lo) & fmask, _sh((1 << ev.bits) - 1, ev.taint.lo) & fmask


# ------------------------------------------------------------------------------------------ checks (data)

@dataclass(frozen=True)
class CmpBits:
    """Compared with a constant whose bits under ``mask`` are ``value`` (None: any non-zero bits)."""
    mask: int
    value: int | None = None

    def __call__(self, ev: Event) -> bool:
        const, window = _field_view(ev)
        w = window & self.mask
        if ev.kind != "cmp" or not w:
            return False
        if self.value is None:
            return bool(const & w)
        # The compared bits must say something about the value (a byte compared with 0 does not).
        return (self.value & w) != 0 and (const & w) == (self.value & w)


@dataclass(frozen=True)
class CmpAny:
    """Compared with one of these constants exactly (sentinels, vendor-string pieces)."""
    values: frozenset

    def __call__(self, ev: Event) -> bool:
        return ev.kind == "cmp" and _sh(ev.const, ev.taint.lo) in self.values


@dataclass(frozen=True)
class TestsOnly:
    """Bits tested (test/and/bt, cmp with 0) lie inside ``mask``: e.g. only ECX bit 31."""
    mask: int

    def __call__(self, ev: Event) -> bool:
        tested = _sh(ev.const, ev.taint.lo) & ((1 << ev.taint.width) - 1)
        return ev.kind == "test" and tested != 0 and tested & ~self.mask == 0


@dataclass(frozen=True)
class Delta:
    """The site's value subtracted from (or compared with) a later read of the same counter."""

    def __call__(self, ev: Event) -> bool:
        return ev.kind == "delta"


@dataclass(frozen=True)
class Holds:
    """Before the site, register ``reg`` (family) holds a constant in [lo, hi] under ``mask``."""
    reg: str
    lo: int
    hi: int | None = None
    mask: int = 0xFFFFFFFF

    def __call__(self, regs: dict) -> bool:
        v = regs.get(self.reg)
        hi = self.lo if self.hi is None else self.hi
        return isinstance(v, Const) and v.mask & self.mask == self.mask and self.lo <= v.value & self.mask <= hi

    def possible(self, regs: dict) -> bool:
        """Not contradicted: the register is unknown here (a caller may set it), or holds the value."""
        v = regs.get(self.reg)
        return not (isinstance(v, Const) and v.mask & self.mask == self.mask) or self(regs)


@dataclass(frozen=True)
class Idiom:
    name: str
    triggers: frozenset
    why: str
    setup: tuple = ()          # Holds(...) all required before the site
    fields: frozenset = frozenset()
    checks: tuple = ()         # any one matching event on one of ``fields``; () = the set-up alone suffices
    operands: str = ""         # regex the site's operand text must contain (e.g. the port in DX, not an imm8)
    before: bytes = b""        # bytes right before the site (a signature such as Xen's ud2; "xen")

    def matches(self, regs_at_site: dict, events: list[Event], site_ops: str = "", preceding: bytes = b"") -> bool:
        if not re.search(self.operands, site_ops) or not all(h(regs_at_site) for h in self.setup):
            return False
        if self.before and not preceding.endswith(self.before):
            return False
        return not self.checks or any(
            ev.taint.field in self.fields and check(ev) for ev in events for check in self.checks)


def _pieces(*signatures: bytes) -> frozenset:
    # A 12-byte vendor signature comes back in EBX, ECX, EDX; pieces with NUL bytes are too common to count.
    return frozenset(p for s in signatures for p in struct.unpack("<3I", s) if all(p >> k & 0xFF for k in (0, 8, 16, 24)))


VENDOR_PIECES = _pieces(b"VMwareVMware", b"KVMKVMKVM\0\0\0", b"Microsoft Hv", b"XenVMMXenVMM", b"VBoxVBoxVBox",
                        b"TCGTCGTCGTCG", b" lrpepyh  vr", b"bhyve bhyve ", b"ACRNACRNACRN")
HV_LEAVES = Holds("a", 0x40000000, 0x4FFFFFFF)   # CPUID leaves reserved for hypervisors (SDM)

# First matching row wins, so a stronger idiom comes before a weaker one with the same trigger.
IDIOMS: tuple[Idiom, ...] = (
    Idiom("redpill", frozenset({"sidt"}),
          "Red Pill: top byte of the IDT base compared with 0xD0 — a VMM relocates the IDT high",
          fields=frozenset({"base"}), checks=(CmpBits(0xFF000000, 0xD0000000),)),
    Idiom("dtbase-ff", frozenset({"sidt", "sgdt"}),
          "descriptor-table base >> 24 compared with 0xFF — a VMM parks the guest's table at the top of memory",
          fields=frozenset({"base"}), checks=(CmpBits(0xFF000000, 0xFF000000),)),
    Idiom("sldt-sentinel", frozenset({"sldt"}),
          "SLDT into a 0xDEADBEEF-filled buffer, compared with the sentinel — 0xDEAD0000 (LDTR 0) means native",
          fields=frozenset({"ldtr"}), checks=(CmpAny(frozenset({0xDEAD0000, 0xDEADBEEF})),)),
    Idiom("str-4000", frozenset({"str"}),
          "STR compared with 0x4000 — the task register selector VMware gives its guests",
          fields=frozenset({"tr"}), checks=(CmpBits(0xFFFF, 0x4000),)),
    Idiom("smsw-check", frozenset({"smsw"}),
          "SMSW result compared or its bits (PE/MP/EM/TS/ET/NE) tested — the machine status word a VMM leaves "
          "differs from native",
          fields=frozenset({"msw"}), checks=(CmpBits(0xFFFFFFFF), TestsOnly(0xFFFFFFFF))),
    Idiom("vmware-backdoor", frozenset({"in"}),
          "VMware backdoor: IN from port 0x5658 ('VX') with EAX = 0x564D5868 ('VMXh') — only VMware answers",
          setup=(Holds("a", 0x564D5868), Holds("d", 0x5658, mask=0xFFFF)), operands=r"\bdx$"),
    Idiom("vmware-backdoor-hb", frozenset({"ins", "outs"}),
          "VMware high-bandwidth backdoor: string I/O on port 0x5659 ('VY') with EAX = 0x564D5868 ('VMXh') — only "
          "VMware answers",
          setup=(Holds("a", 0x564D5868), Holds("d", 0x5659, mask=0xFFFF))),
    Idiom("xen-cpuid-signature", frozenset({"cpuid"}),
          "Xen's forced-emulation prefix: ud2 then the bytes 'xen' before CPUID — a PV guest's way to get Xen's CPUID "
          "answers; on bare hardware the ud2 faults (the 'xen' bytes are not instructions, whatever a disassembler "
          "shows)",
          before=b"\x0f\x0bxen"),
    Idiom("cpuid-hypervisor-bit", frozenset({"cpuid"}),
          "CPUID leaf 1 ECX bit 31 tested — the hypervisor-present bit every modern VMM sets",
          setup=(Holds("a", 1),), fields=frozenset({"ecx"}),
          checks=(TestsOnly(1 << 31), CmpBits(1 << 31, 1 << 31))),
    Idiom("cpuid-vendor", frozenset({"cpuid"}),
          "CPUID hypervisor leaf 0x4000xxxx, signature compared with a hypervisor's name (VMware, KVM, Hyper-V, "
          "Xen, ...)",
          setup=(HV_LEAVES,), fields=frozenset({"ebx", "ecx", "edx"}), checks=(CmpAny(VENDOR_PIECES),)),
    Idiom("rdtsc-delta", frozenset({"rdtsc"}),
          "two RDTSC reads subtracted — a timing check: around CPUID or another instruction a monitor intercepts, "
          "the delta is far larger under a VMM",
          fields=frozenset({"tsc"}), checks=(Delta(),)),
    Idiom("cpuid-hv-leaf", frozenset({"cpuid"}),
          "CPUID hypervisor leaf 0x4000xxxx queried (weaker: no signature comparison seen nearby) — only a "
          "hypervisor answers it",
          setup=(HV_LEAVES,)),
)


# ------------------------------------------------------------------------------------------ operands

def _gprs() -> dict[str, tuple[str, int, int]]:
    """Register name -> (family, bit offset, size in bytes)."""
    table: dict[str, tuple[str, int, int]] = {}
    for f in "abcd":
        for name, size in ((f"r{f}x", 8), (f"e{f}x", 4), (f"{f}x", 2), (f"{f}l", 1)):
            table[name] = (f, 0, size)
        table[f"{f}h"] = (f, 8, 1)
    for f in ("si", "di", "bp", "sp"):
        for name, size in ((f"r{f}", 8), (f"e{f}", 4), (f, 2), (f"{f}l", 1)):
            table[name] = (f, 0, size)
    for n in range(8, 16):
        for name, size in ((f"r{n}", 8), (f"r{n}d", 4), (f"r{n}w", 2), (f"r{n}b", 1)):
            table[name] = (f"r{n}", 0, size)
    return table


GPR = _gprs()
_SIZES = {"byte": 1, "word": 2, "dword": 4, "fword": 6, "qword": 8, "tbyte": 10, "xmmword": 16}
_MEM = re.compile(r"^(?:(\w+) ptr )?(?:(\w+):)?\[([^\]]*)\]$")
_TERM = re.compile(r"([+-])?\s*([\w*]+)")


@dataclass(frozen=True)
class Reg:
    family: str
    off: int         # bits
    size: int        # bytes


@dataclass(frozen=True)
class Mem:
    key: tuple       # segment and the register part of the address, e.g. ("", "bp"); ("sp",) for the stack
    disp: int
    size: int | None
    regs: frozenset  # register families the address depends on


@dataclass(frozen=True)
class Imm:
    value: int


def _operand(text: str, next_ip: int, sp_delta: int):
    if text in GPR:
        return Reg(*GPR[text])
    m = _MEM.match(text)
    if m:
        size, seg, inner = m.group(1), m.group(2) or "", m.group(3)
        regs, disp = [], 0
        for sign, term in _TERM.findall(inner):
            if term[0].isdigit():
                try:
                    disp += -int(term, 0) if sign == "-" else int(term, 0)
                except ValueError:
                    return None
            elif term in ("rip", "eip"):
                disp += next_ip          # RIP-relative: key it by its absolute address
            else:
                name, _, scale = term.partition("*")
                regs.append(GPR[name][0] + (f"*{scale}" if scale else "") if name in GPR else name)
        fams = frozenset(r.split("*")[0] for r in regs)
        if regs == ["sp"] and seg in ("", "ss"):
            # The stack moves with push/pop: key it by offset from the stack pointer at the window's start.
            return Mem(("sp",), disp + sp_delta, _SIZES.get(size), fams)
        return Mem((seg, *sorted(regs)), disp, _SIZES.get(size), fams)
    try:
        return Imm(int(text, 0))
    except ValueError:
        return None                      # segment/control registers, far pointers: not tracked


# ------------------------------------------------------------------------------------------ the data-flow

class _Flow:
    """Registers (by family), memory bytes and the stack offset over one window."""

    def __init__(self, mode: int):
        self.mode, self.word = mode, {16: 2, 32: 4, 64: 8}[mode]
        self.regs: dict[str, Const | Taint] = {}
        self.mem: dict[tuple, Const | Taint] = {}   # (key, disp) -> one byte: Const(b, 0xFF) or a byte Taint
        self.sp = 0
        self.events: list[Event] = []
        self.last_test: Event | None = None     # the event of the instruction just before (test r, r)

    def reset(self) -> None:
        self.regs.clear()
        self.mem.clear()
        self.sp = 0

    # -- reads and writes

    def resolve(self, op):
        """``[r + d]`` with r holding the address of a cell: that cell, ``+ d``."""
        if isinstance(op, Mem) and len(op.key) == 2 and op.key[0] in ("", "ds", "ss"):
            v = self.regs.get(op.key[1])
            if isinstance(v, Addr) and v.part == 0:
                return Mem(v.key, v.disp + op.disp, op.size, frozenset())
        return op

    def read(self, op, size: int | None = None):
        if isinstance(op, Imm):
            bits = 8 * (size or self.word)
            return Const(op.value & ((1 << bits) - 1), (1 << bits) - 1)
        if isinstance(op, Reg):
            if op.family == "sp":
                return Addr(("sp",), self.sp) if op.size == self.word else None
            v = self.regs.get(op.family)
            full = (1 << 8 * op.size) - 1
            if isinstance(v, Taint):
                return Taint(v.field, v.lo + op.off, v.width)
            if isinstance(v, Const) and (v.mask >> op.off) & full == full:
                return Const((v.value >> op.off) & full, full)
            if isinstance(v, Addr) and op.size >= min(4, self.word) and not op.off:
                return v
            return None
        if isinstance(op, Mem):
            n = op.size or size or self.word
            cells = [self.mem.get((op.key, op.disp + k)) for k in range(n)]
            if all(isinstance(c, Const) for c in cells):
                return Const(sum(c.value << 8 * k for k, c in enumerate(cells)), (1 << 8 * n) - 1)
            if isinstance(cells[0], Addr) and all(c == replace(cells[0], part=k) for k, c in enumerate(cells)):
                return replace(cells[0], part=0)
            for k, c in enumerate(cells):
                if isinstance(c, Taint):     # bit 0 of the load is field bit c.lo - 8k
                    return Taint(c.field, c.lo - 8 * k, c.width)
        return None

    def write(self, op, value) -> None:
        if isinstance(op, Reg):
            self._forget_addressed_by(op.family)
            if op.family == "sp":
                if isinstance(value, Addr) and value.key == ("sp",):
                    self.sp = value.disp         # mov esp, ebp: the frame pointer's copy of the stack pointer
                else:
                    self._lose_stack()
                return
            if value is None:
                self.regs.pop(op.family, None)
            elif isinstance(value, Taint):       # a partial write of a taint keeps it whole (approximation)
                self.regs[op.family] = Taint(value.field, value.lo - op.off, value.width)
            elif isinstance(value, Addr):
                self.regs[op.family] = value
            elif op.size >= 4:                   # a 32-bit write zero-extends in 64-bit mode
                self.regs[op.family] = Const(value.value, -1)
            else:                                # AL/AH/AX: merge into what is known of the rest
                old = self.regs.get(op.family)
                base = old if isinstance(old, Const) else Const(0, 0)
                bits = ((1 << 8 * op.size) - 1) << op.off
                self.regs[op.family] = Const((base.value & ~bits) | (value.value << op.off & bits),
                                             (base.mask & ~bits) | (value.mask << op.off & bits))
        elif isinstance(op, Mem):
            n = op.size or self.word
            for k in range(n):
                cell = (op.key, op.disp + k)
                if isinstance(value, Const) and (value.mask >> 8 * k) & 0xFF == 0xFF:
                    self.mem[cell] = Const((value.value >> 8 * k) & 0xFF, 0xFF)
                elif isinstance(value, Taint):
                    self.mem[cell] = Taint(value.field, value.lo + 8 * k, value.width)
                elif isinstance(value, Addr) and n == self.word:
                    self.mem[cell] = replace(value, part=k)
                else:
                    self.mem.pop(cell, None)

    def _forget_addressed_by(self, family: str) -> None:
        if family != "sp":
            self.mem = {c: v for c, v in self.mem.items() if family not in {p.split("*")[0] for p in c[0][1:]}}
            for fam, v in list(self.regs.items()):
                if isinstance(v, Addr) and family in {p.split("*")[0] for p in v.key[1:]}:
                    del self.regs[fam]

    def _lose_stack(self) -> None:
        self.mem = {c: v for c, v in self.mem.items() if c[0] != ("sp",)}

    def event(self, kind: str, a, b, bits: int) -> None:
        if kind == "cmp" and isinstance(a, Taint) and isinstance(b, Taint) and {a.field, b.field} == {"tsc", "tsc-later"}:
            # A later time-stamp read minus the site's: a measured delta (sub, or cmp of the two).
            self.events.append(Event("delta", a if a.field == "tsc" else b, 0, bits))
            return
        if isinstance(a, Const) and isinstance(b, Taint):
            a, b = b, a
        if isinstance(a, Taint) and isinstance(b, Const):
            if kind == "cmp" and b.value == 0:   # cmp x, 0 asks "is any bit set": a test of the whole operand
                kind, b = "test", Const((1 << bits) - 1, b.mask)
            self.events.append(Event(kind, a, b.value, bits))


def _size(flow: _Flow, ops: list) -> int:
    for op in ops:
        if isinstance(op, Reg):
            return op.size
        if isinstance(op, Mem) and op.size:
            return op.size
    return flow.word


# Instruction handlers (capa's INSTRUCTION_HANDLERS idea): each gets the flow, the parsed operands, the mnemonic.

def _mov(flow, ops, mn):
    value = flow.read(ops[1], _size(flow, ops[:1]))
    if mn in ("movsx", "movsxd") and isinstance(value, Const):
        bits = value.mask.bit_length()       # sign-extend a known constant; a taint keeps its bits
        value = Const(value.value - ((value.value >> (bits - 1)) << bits), -1) if bits else value
    flow.write(ops[0], value)


def _lea(flow, ops, mn):
    # The operand was resolved already: [r + d] with r a known address is that address + d.
    m = ops[1]
    known = isinstance(m, Mem) and (m.key == ("sp",) or (len(m.key) == 2 and "*" not in m.key[1]))
    flow.write(ops[0], Addr(m.key, m.disp) if known else None)


def _cmp(flow, ops, mn):
    n = _size(flow, ops)
    flow.event("cmp", flow.read(ops[0], n), flow.read(ops[1], n), 8 * n)
    if mn == "sub":
        _alu(flow, ops, mn, record=False)


def _test(flow, ops, mn):
    n = _size(flow, ops)
    a, b = flow.read(ops[0], n), flow.read(ops[1], n)
    if ops[0] == ops[1] and isinstance(a, Taint):   # test r, r: every bit of r
        b = Const((1 << 8 * n) - 1, (1 << 8 * n) - 1)
    count = len(flow.events)
    flow.event("test", a, b, 8 * n)
    if ops[0] == ops[1] and len(flow.events) > count:
        flow.last_test = flow.events[-1]          # a following js/jns narrows it to the sign bit


def _bt(flow, ops, mn):
    a, b = flow.read(ops[0]), flow.read(ops[1], 1)
    if isinstance(b, Const):
        flow.event("test", a, Const(1 << (b.value & 63), -1), 8 * _size(flow, ops))


_FOLD = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "xor": lambda a, b: a ^ b,
         "or": lambda a, b: a | b, "and": lambda a, b: a & b, "shl": lambda a, b: a << b,
         "sal": lambda a, b: a << b, "shr": lambda a, b: a >> b, "sar": lambda a, b: a >> b}


def _alu(flow, ops, mn, record=True):
    n = _size(flow, ops)
    if isinstance(ops[0], Reg) and ops[0].family == "sp" and isinstance(ops[1], Imm) and mn in ("add", "sub"):
        flow.sp += ops[1].value if mn == "add" else -ops[1].value   # a frame opens or closes: keys stay valid
        return
    a = flow.read(ops[0], n)
    b = flow.read(ops[1], 1 if mn in ("shl", "sal", "shr", "sar") else n) if len(ops) > 1 else None
    full = (1 << 8 * n) - 1
    if mn == "xor" and ops[0] == ops[1]:
        out = Const(0, full)
    elif isinstance(a, Addr) and isinstance(b, Const) and mn in ("add", "sub") and a.part == 0:
        out = replace(a, disp=a.disp + (b.value if mn == "add" else -b.value))   # a pointer moved along a buffer
    elif isinstance(a, Taint) and isinstance(b, Const) and mn in ("xor", "or"):
        out = a   # `!bit` compiles to xor 1: the same bits, some flipped or set; what is tested next still tells
    elif isinstance(a, Const) and isinstance(b, Const) and a.mask & full == full:
        out = Const(_FOLD[mn](a.value, b.value) & full, full)
    elif isinstance(a, Taint) and isinstance(b, Const) and mn in ("shr", "sar", "shl", "sal"):
        out = Taint(a.field, a.lo + (b.value if mn in ("shr", "sar") else -b.value), a.width)
        if record and mn == "shr" and b.value == 8 * n - 1:
            # Only the top bit is left (a compiler's `return (x >> 31) & 1`): that bit is what is tested.
            flow.event("test", out, Const(1, 1), 8 * n)
    elif isinstance(a, Taint) and isinstance(b, Const) and mn == "and":
        if record:
            flow.event("test", a, b, 8 * n)   # and with a mask is how compilers test bits too
        out = a
    else:
        out = None
    flow.write(ops[0], out)


def _push(flow, ops, mn):
    value = flow.read(ops[0], flow.word) if ops and ops[0] is not None else None   # pushfd: unknown value
    flow.sp -= flow.word
    flow.write(Mem(("sp",), flow.sp, flow.word, frozenset()), value)


def _pop(flow, ops, mn):
    value = flow.read(Mem(("sp",), flow.sp, flow.word, frozenset()))
    flow.sp += flow.word
    if ops and ops[0] is not None:
        flow.write(ops[0], value)


def _xchg(flow, ops, mn):
    a, b = flow.read(ops[0]), flow.read(ops[1])
    flow.write(ops[0], b)
    flow.write(ops[1], a)


HANDLERS = {
    "lea": _lea, "mov": _mov, "movzx": _mov, "movsx": _mov, "movsxd": _mov, "movabs": _mov,
    "cmp": _cmp, "sub": _cmp, "test": _test, "bt": _bt,
    "and": _alu, "or": _alu, "xor": _alu, "add": _alu, "shl": _alu, "sal": _alu, "shr": _alu, "sar": _alu,
    "push": _push, "pop": _pop, "xchg": _xchg,
    "pushfd": _push, "pushfq": _push, "pushf": _push, "popfd": _pop, "popfq": _pop, "popf": _pop,
}
_STACK_ONLY = frozenset({"push", "pop", "pushfd", "pushfq", "pushf", "popfd", "popfq", "popf"})
# Registers written without being named as the first operand; "call" stands for the callee's clobbers.
IMPLICIT = {"cpuid": "abcd", "rdtsc": "ad", "rdtscp": "acd", "mul": "ad", "div": "ad", "idiv": "ad", "cdq": "d",
            "cwd": "d", "cqo": "d", "cwde": "a", "cdqe": "a", "leave": ("sp", "bp"), "lodsb": "a", "lodsd": "a",
            "pushal": ("sp",), "popal": ("sp", "a", "b", "c", "d", "si", "di", "bp"),
            "call": ("a", "c", "d", "si", "di", "r8", "r9", "r10", "r11")}
NO_WRITE = frozenset({"cmp", "test", "bt", "push", "nop", "out", "outsb", "outsw", "outsd", "call", "int", "loop",
                      "jecxz", "jrcxz", "stosb", "stosd", "stosq"})
# Control leaves the straight line: what follows is not reached by falling through.
BARRIERS = frozenset({"jmp", "ljmp", "ret", "retf", "iret", "iretd", "iretq", "hlt", "ud2", "int3", BAD})


def _operands(flow: _Flow, op_str: str, address: int, size: int) -> list:
    return [flow.resolve(_operand(t, address + size, flow.sp)) for t in op_str.split(", ")] if op_str else []


def _step(flow: _Flow, address: int, size: int, mn: str, op_str: str) -> None:
    ops = _operands(flow, op_str, address, size)
    previous, flow.last_test = flow.last_test, None
    if mn in ("js", "jns") and previous is not None and flow.events and flow.events[-1] is previous:
        # test r, r; js: only the sign bit decides the branch.
        flow.events[-1] = Event("test", previous.taint, 1 << (previous.bits - 1), previous.bits)
    if mn == "rdtsc":                       # a later read of the counter than the site's
        flow.write(Reg("a", 0, 4), Taint("tsc-later", 0, 32))
        flow.write(Reg("d", 0, 4), Taint("tsc-later", 32, 32))
        return
    handler = HANDLERS.get(mn)
    if handler and (mn in _STACK_ONLY or (len(ops) >= 2 and None not in ops[:2])):
        handler(flow, ops, mn)
    elif ops and mn not in NO_WRITE and not mn.startswith("j") and ops[0] is not None:
        flow.write(ops[0], None)
    for fam in IMPLICIT.get(mn, ()):
        flow.write(Reg(fam, 0, 8), None)


# ------------------------------------------------------------------------------------------ the site itself

def _site_effect(flow: _Flow, name: str, op_str: str, address: int, size: int) -> None:
    ops = _operands(flow, op_str, address, size)
    if name in ("sidt", "sgdt") and ops and isinstance(ops[0], Mem):
        # The stored descriptor: a 16-bit limit, then the base (32-bit, or 64-bit in long mode).
        width = 64 if flow.mode == 64 else 32
        m = ops[0]
        flow.write(Mem(m.key, m.disp, 2, m.regs), Taint("limit", 0, 16))
        flow.write(Mem(m.key, m.disp + 2, width // 8, m.regs), Taint("base", 0, width))
    elif name in ("sldt", "str", "smsw") and ops:
        field = {"sldt": "ldtr", "str": "tr", "smsw": "msw"}[name]
        dest = ops[0]
        if isinstance(dest, Mem):                   # the memory form stores 16 bits, whatever the size
            dest = Mem(dest.key, dest.disp, 2, dest.regs)
        flow.write(dest, Taint(field, 0, 32 if name == "smsw" and isinstance(dest, Reg) else 16))
    elif name == "cpuid":
        for fam in "abcd":
            flow.write(Reg(fam, 0, 4), Taint(f"e{fam}x", 0, 32))
    elif name == "rdtsc":
        flow.write(Reg("a", 0, 4), Taint("tsc", 0, 32))
        flow.write(Reg("d", 0, 4), Taint("tsc", 32, 32))
    elif name == "in" and ops:
        flow.write(ops[0], Taint("port", 0, 8 * (getattr(ops[0], "size", None) or flow.word)))
    else:
        _step(flow, address, size, name, op_str)


# ------------------------------------------------------------------------------------------ entry point

def _window_start(code: bytes, base: int, mode: int, off: int) -> int:
    """The earliest offset within BACK_BYTES from which a linear decode lands exactly on ``off``."""
    lo = max(0, off - BACK_BYTES)
    window = bytes(code[lo:off + 1])
    for start in range(lo, off):
        for address, _size, _mn, _ops in sweep(window, base + lo, mode, offset=start - lo, count=BACK_BYTES):
            if address - base >= off:
                if address - base == off:
                    return start
                break
    return off


def _run(flow: _Flow, code: bytes, base: int, mode: int, start: int, stop: int) -> bool:
    """Step the flow over the instructions from ``start`` up to ``stop``; True when decoding lands on stop.
    A barrier (jmp, ret) resets the flow: what follows it is a jump target with unknown state."""
    end = start
    for addr, size, mn, op_str in sweep(bytes(code[start:stop]), base + start, mode):
        mn = mn.rsplit(" ", 1)[-1]      # "bnd ret", "notrack jmp", "rep stosd": the prefix changes no flow here
        if mn in BARRIERS:
            flow.reset()
        else:
            _step(flow, addr, size, mn, op_str)
        end = addr + size - base
    return end == stop


def analyse_site(code: bytes, base: int, mode: int, address: int, name: str,
                 flow: _Flow | None = None) -> tuple[dict, list[Event], str]:
    """Register constants just before the site, events after it, the site's operand text (for tests, debugging).
    ``flow``: the state the site's function was entered with (see ``_through_callers``); by default the window
    before the site is decoded."""
    off = address - base
    assert 0 <= off < len(code), f"site 0x{address:x} outside the region"
    if flow is None:
        flow = _Flow(mode)
        # Look back only when some row needs a set-up for this trigger: the re-synchronising decode is the cost.
        if name in NEEDS_SETUP:
            _run(flow, code, base, mode, _window_start(code, base, mode, off), off)
    forward = FORWARD_FOR.get(name, FORWARD)
    end = min(len(code), off + 15 * (forward + 1))
    at_site, site_ops = dict(flow.regs), ""
    for n, (addr, size, mn, op_str) in enumerate(sweep(bytes(code[off:end]), address, mode, count=forward + 1)):
        mn = mn.rsplit(" ", 1)[-1]
        if n == 0:
            site_ops = op_str
            _site_effect(flow, name, op_str, addr, size)
            continue
        if mn in BARRIERS:
            break
        _step(flow, addr, size, mn, op_str)
    return at_site, flow.events, site_ops


CALLEE_REACH = 96     # bytes from a function's start to a site whose set-up the caller may have done
MAX_CALLERS = 8


def _call_targets(code: bytes, mode: int) -> dict[int, list[int]]:
    """{target offset: [offsets of E8 bytes calling it]} for every E8 rel16/rel32 whose target lies in the
    region; which of them are real calls is checked by decoding, only where a site needs it."""
    width = 2 if mode == 16 else 4
    targets: dict[int, list[int]] = {}
    i = code.find(b"\xe8")
    while i != -1:
        if i + 1 + width <= len(code):
            t = i + 1 + width + int.from_bytes(code[i + 1:i + 1 + width], "little", signed=True)
            if 0 <= t < len(code):
                targets.setdefault(t, []).append(i)
        i = code.find(b"\xe8", i + 1)
    return targets


def _through_callers(code: bytes, base: int, mode: int, off: int, targets: dict[int, list[int]]):
    """For a site in a small function, the state at the site as each direct caller enters it: the caller's
    window up to its call, the return address pushed, then the function's instructions up to the site
    (the VMware backdoor helper that loads EAX and DX from a block its caller filled). Yields
    (flow, caller address)."""
    start = next((t for t in range(off, max(-1, off - CALLEE_REACH), -1) if t in targets), None)
    if start is None or not _run(_Flow(mode), code, base, mode, start, off):
        return
    for call in targets[start][:MAX_CALLERS]:
        insn = next(iter(sweep(code, base, mode, call, 1)), None)
        if insn is None or insn[2] != "call" or _target(insn[3]) != base + start:
            continue            # an E8 byte inside another instruction, or data
        flow = _Flow(mode)
        if not _run(flow, code, base, mode, _window_start(code, base, mode, call), call):
            continue
        flow.sp -= flow.word                       # the return address
        flow.write(Mem(("sp",), flow.sp, flow.word, frozenset()), None)
        if _run(flow, code, base, mode, start, off):
            yield flow, base + call


def _target(op_str: str) -> int | None:
    try:
        return int(op_str, 0)
    except ValueError:
        return None


TRIGGERS = frozenset(t for idiom in IDIOMS for t in idiom.triggers)
NEEDS_SETUP = frozenset(t for idiom in IDIOMS if idiom.setup for t in idiom.triggers)
SIGNATURES = {idiom.name: len(idiom.before) for idiom in IDIOMS if idiom.before}


def _possible_rows(code: bytes) -> tuple[Idiom, ...]:
    """The rows that can match in this region. The flow knows a register's constant only from an immediate
    in the code, so a row whose set-up needs a distinctive 32-bit value ('VMXh') cannot match in a region
    where those four bytes never occur: its sites are not analysed at all (the cost of a scan full of IN and
    INS decoded out of data)."""
    def present(h: Holds) -> bool:
        return h.hi is not None or h.mask != 0xFFFFFFFF or h.lo <= 0xFFFF or h.lo.to_bytes(4, "little") in code
    return tuple(i for i in IDIOMS if all(present(h) for h in i.setup))


def _match(name: str, regs: dict, events: list[Event], site_ops: str, preceding: bytes,
           rows: tuple[Idiom, ...] = IDIOMS) -> Idiom | None:
    return next((i for i in rows if name in i.triggers and i.matches(regs, events, site_ops, preceding)), None)


def find_idioms(code: bytes, base: int, mode: int, sites: list[tuple[int, str]]) -> dict[int, tuple[str, str]]:
    """VM-detection idioms at scanner sites: {site address: (idiom name, one-line why)}.

    ``code`` is one region's bytes starting at virtual address ``base``, decoded in ``mode`` (16/32/64);
    ``sites`` are (address, canonical name) of findings in that region. Sites that match no row are absent.
    A site whose set-up is not in its own window (a helper given its registers by its caller) is looked at
    again as each direct caller enters its function.
    """
    found: dict[int, tuple[str, str]] = {}
    targets = None
    rows = _possible_rows(code)
    for address, name in sites:
        if not any(name in i.triggers for i in rows):
            continue
        off = address - base
        preceding = bytes(code[max(0, off - 8):off])
        regs, events, site_ops = analyse_site(code, base, mode, address, name)
        idiom = _match(name, regs, events, site_ops, preceding, rows)
        # A caller can only supply what the site's own window leaves unknown (DX = 0x3F8 here is no backdoor).
        if idiom is None and any(name in i.triggers and i.setup and all(h.possible(regs) for h in i.setup)
                                 for i in rows):
            targets = _call_targets(code, mode) if targets is None else targets
            for flow, caller in _through_callers(code, base, mode, off, targets):
                idiom = _match(name, *analyse_site(code, base, mode, address, name, flow), preceding, rows)
                if idiom is not None and idiom.setup:
                    found[address] = (idiom.name, f"{idiom.why} (set up by the caller at 0x{caller:x})")
                    break
            continue
        if idiom is not None:
            found[address] = (idiom.name, idiom.why)
    return found
