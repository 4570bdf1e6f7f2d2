"""Random whole guests for differential testing (Hypothesis strategies), as popek asm text and as bytes.

A generated guest is a ``GuestSpec``: a few options, the initial registers, the initial contents of a
scratch area, a body of random items and up to three subroutines. Rendered, it is one self-contained
source in the ``popek asm`` dialect (no includes), laid out at fixed addresses:

    IDT       0x000FD000   0x32 gates (vectors 0-0x31: exceptions, IRQ 0-15 at 0x20, int 0x30/0x31), filled at
                           run time, every one first pointing at ``unexpected``; a vector beyond is a #GP
    data      0x000FE000   GDT (when the guest has its own), GDTR/IDTR images, TSS, counters, selector
                           table, far pointers, the 256-byte scratch area, strings
    code      0x00100000   prologue, body, epilogue, subroutines, handlers
    stack     0x00090000   (ESP at boot, and the TSS ring-0 stack)

The **prologue** optionally loads its own GDT (pm.inc's: ring-0/1/3 segments and a TSS) and reloads every
segment register and TR, saves GDTR with ``sgdt``, optionally builds an IDT (handlers for #DE, #UD and #GP
that skip the faulting instruction, ``int3``/``into``/``int 0x30``/``int 0x31`` through trap and interrupt
gates, IRQ 0, and ``unexpected`` everywhere else), optionally programs the 8259 and the 8254 for a periodic
IRQ 0 whose handler counts ticks, sets the initial registers and optionally enables interrupts.

The **body** mixes innocuous ALU, multiply, bit, flag, string and memory instructions on the scratch area,
stack pushes and pops, forward branches, bounded loops (counters in memory, so random register updates
cannot make them run away), near calls, every sensitive-unprivileged class of DESIGN §3.1 at CPL 0 (``sgdt
sidt sldt smsw str pushf popf push_seg pop_seg mov_from_seg mov_to_seg lar lsl verr verw jmp_far call_far
ret_far int iret``, with valid selectors) and the privileged ones (``cli sti lgdt lidt lldt mov_cr`` (reads,
and writes that keep the machine usable) ``in out ins outs hlt`` (only with a timer armed) ``invlpg clts
lmsw`` (keeping PE) ``cpuid``), and, when asked, faults that the handlers skip: a guest stores the address
after the faulting instruction in ``resume`` first; a fault with ``resume`` clear is unexpected. Adversarial
items aim at a monitor's own edges: near branches behind prefixes (``f2 f3 2e 3e 26 36 64 65 67``),
16-bit operand- and address-size branches (``66 e9``/``e8``/``0f 8x`` to a landing pad below 64 KiB, ``jmp
ax``, ``ret`` with 66, ``67 jcxz``/``loop``), reads at the top of RAM, at the end of monitor memory and the
cache (faulting ones only with handlers), and stores into the next instruction (self-modifying code, counted
exactly by the bare machine: popek.machine.selfmod).

The **epilogue** saves EFLAGS and the general registers as the body left them, then prints them, a
checksum of the scratch area (and of the trace that ``Options.trace`` keeps) and the counters (ticks, software interrupts, faults, the last error code,
far calls) to COM1 and exits through port 0xF4 with code 0. ``unexpected`` prints the vector's frame and
exits with 0xEE (``UNEXPECTED_EXIT``); a generated guest that does so is a generator bug.

Guests always terminate: loops run 1-4 times and nest at most two deep, subroutines call nothing, and
``hlt`` only waits for an armed periodic timer. Run them with a budget anyway (``BUDGET``).

Two ways to bytes. ``GuestSpec.text`` is the source, which ``popek.asm.assemble_text`` accepts (and which
tests/regressions/ stores). ``GuestSpec.build()`` produces the identical image about a hundred times
faster, because property tests assemble thousands of guests: every line is a *template* with numeric
fields, assembled once per process by popek.asm with two dummy values per field to find where the field's
bytes are, and patched afterwards; near branches are encoded here (rel32). A template's encoding depends on
whether an immediate fits a sign-extended byte, so that is part of the template's key.
tests/test_differential.py checks ``build()`` against ``assemble_text(text)`` on generated guests.

Public API: ``guests(...)`` (the strategy) and ``options(...)``; ``GuestSpec`` (``text``, ``build()``,
``guest(name)``, ``kinds``, ``digest``) and ``Options``; ``LEAVES`` (item kind -> renderer and parameter
strategies) and ``FAULTS``; ``shrink(spec, still_fails)`` and ``simplifications(spec)`` for failures found
outside Hypothesis; ``BUDGET``, ``EXIT_OK``, ``UNEXPECTED_EXIT``.

Limits: the body runs at CPL 0 only (a ring-3 body would mostly exercise the #GP path); no paging, no
LDT, no task switches.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import cached_property, lru_cache

from hypothesis import strategies as st

# --- layout -------------------------------------------------------------------------------------------------
IDT = 0x000FD000
DATA = 0x000FE000
CODE = 0x00100000
STACK = 0x00090000
SCRATCH_SIZE = 256
RAM_SIZE = 32 << 20                 # the machine's default; MONITOR below is the first byte past guest RAM
MONITOR = RAM_SIZE

SYMBOLS = {                         # data symbols at fixed addresses (rendered with .org in the source)
    "gdt": DATA + 0x000, "gdtr": DATA + 0x040, "idtr": DATA + 0x048, "saved_gdtr": DATA + 0x050,
    "tss": DATA + 0x060,
    "ticks": DATA + 0x100, "ints": DATA + 0x104, "faults": DATA + 0x108, "resume": DATA + 0x10C,
    "last_error": DATA + 0x110, "zero": DATA + 0x114, "divisor": DATA + 0x118, "farcalls": DATA + 0x11C,
    "sels": DATA + 0x140, "pad_to": DATA + 0x160, "counters": DATA + 0x200, "farptrs": DATA + 0x300, "scratch": DATA + 0x400,
    "trace": DATA + 0x500, "strings": DATA + 0x600,
}
TRACE_SLOTS = 32                    # 8 bytes each (EFLAGS, one register) right after the scratch area
FARPTR_SLOTS = 32
SUB_COUNTERS = 16                   # subroutines' loops count in counters[16..]

KCODE, KDATA = 0x08, 0x10
GDT = (0, 0, 0x0000FFFF, 0x00CF9A00, 0x0000FFFF, 0x00CF9200, 0x0000FFFF, 0x00CFFA00, 0x0000FFFF, 0x00CFF200,
       ((SYMBOLS["tss"] & 0xFFFF) << 16) | 0x67, ((SYMBOLS["tss"] >> 16) & 0xFF) | 0x8900
       | (SYMBOLS["tss"] & 0xFF000000), 0x0000FFFF, 0x00CFBA00, 0x0000FFFF, 0x00CFB200)
# Selectors the body names through the ``sels`` table (index -> selector). Valid and invalid ones: lar,
# lsl, verr and verw take any; segment loads take only those listed as loadable below.
SELECTORS = (0x0000, 0x0008, 0x0010, 0x001B, 0x0023, 0x0028, 0x0031, 0x0039,
             0x0013, 0x0040, 0x1234, 0xFFFF, 0x0018, 0x000B, 0x0030, 0x0020)
LOADABLE_DATA = {True: (0x10, 0x23, 0x39), False: (0x10,)}     # by own_gdt: DS/ES/FS/GS at CPL 0
BAD_DATA = (0x1234, 0x0013, 0x0028, 0xFFFF)   # #GP for DS at CPL 0 under either GDT
BAD_STACK = (0x0008, 0x0023)                  # #GP for SS at CPL 0 under either GDT

UNUSED_PORTS = (0x80, 0x84, 0x2F8, 0x378, 0x3E8, 0x510)
EXIT_OK, UNEXPECTED_EXIT = 0, 0xEE
BUDGET = 1_000_000                  # a safety net: generated guests run under 5,000 instructions
IDT_VECTORS = 0x32

GPR32 = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")     # never esp: the body keeps the stack sane
GPR16 = ("ax", "bx", "cx", "dx", "si", "di", "bp")
GPR8 = ("al", "bl", "cl", "dl", "ah", "bh", "ch", "dh")
CC = ("o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g")
JCC_OPCODE = {f"j{c}": 0x80 + i for i, c in enumerate(CC)}
ALU = ("add", "sub", "adc", "sbb", "and", "or", "xor", "cmp")
SHIFTS = ("shl", "shr", "sar", "rol", "ror", "rcl", "rcr")
# EFLAGS bits a generated popf/iret may set: CF PF AF ZF SF IF DF OF, IOPL, AC, ID (never TF, NT, RF, VM).
SAFE_FLAGS = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x200 | 0x400 | 0x800 | 0x3000 | 0x40000 | 0x200000
CR0_TOGGLE = (1 << 1, 1 << 3, 1 << 5, 1 << 16, 1 << 18)       # MP TS NE WP AM: harmless with paging off
CR4_TOGGLE = (1 << 2, 1 << 3, 1 << 8, 1 << 9, 1 << 10)        # TSD DE PCE OSFXSR OSXMMEXCPT


class GuestgenError(Exception):
    """A template popek.asm encodes in a way the fast builder cannot patch (a generator bug)."""


# --- lines and the fast builder -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Field:
    """A number inside an instruction: an immediate, an absolute address, or a label's address."""

    value: int | None        # None for a label
    width: int               # operand width in bits (8, 16, 32)
    text: str                # how the source writes it
    label: str | None = None

    @property
    def form(self) -> str:
        """'s' when the value fits a sign-extended byte (the short encodings), else 'w'."""
        if self.label is not None:
            return "w"
        v, top = self.value, 1 << self.width
        return "s" if v < 0x80 or v >= top - 0x80 else "w"


def imm(value: int, width: int = 32) -> Field:
    value &= (1 << width) - 1
    return Field(value, width, f"{value:#x}")


def addr(symbol: str, offset: int = 0) -> Field:
    return Field(SYMBOLS[symbol] + offset, 32, symbol if offset == 0 else f"{symbol} + {offset:#x}")


def absolute(value: int) -> Field:
    return Field(value, 32, f"{value:#x}")


def lab(name: str) -> Field:
    return Field(None, 32, name, name)


# Line kinds: ("I", template, fields) an instruction or directive; ("B", op, label) a near branch (rel32);
# ("J", opcode bytes, address) a branch with a 16-bit displacement to an absolute address (after a 0x66
# prefix: EIP is truncated to 16 bits, so the target is below 64 KiB); ("L", name) a label; ("R", bytes,
# text) raw data; ("O", address) pad to address (.org).
_DUMMY = {("s", 8): (0x11, 0x0E), ("s", 16): (0x11, 0xFFEE), ("s", 32): (0x11, 0xFFFFFFEE),
          ("w", 16): (0x1234, 0x9ABC), ("w", 32): (0x12345678, 0x9ABCDEF0)}
_TEMPLATES: dict[tuple, tuple[bytes, tuple[tuple[int, int], ...]]] = {}


def _key(template: str, fields: tuple[Field, ...]) -> tuple:
    return (template,) + tuple((f.form, f.width) for f in fields)


def _encode_templates(keys: list[tuple]) -> None:
    """Assemble the missing templates in one popek.asm call: for each, one line with every field at its
    first dummy and one line per field with that field at its second dummy; the bytes that differ are the
    field."""
    from popek.asm import assemble_text
    lines, spans = [], []
    for key in keys:
        template, forms = key[0], key[1:]
        first = [_DUMMY[f][0] for f in forms]
        variants = [first] + [first[:i] + [_DUMMY[f][1]] + first[i + 1:] for i, f in enumerate(forms)]
        spans.append((key, len(lines), len(variants)))
        lines += [template.format(*(f"{v:#x}" for v in values)) for values in variants]
    program = assemble_text("\n".join(lines), name="<guestgen templates>")
    by_line = {ln.line: ln.data for ln in program.listing}
    for key, start, n in spans:
        base = by_line[start + 1]
        places = []
        for i in range(1, n):
            other = by_line[start + 1 + i]
            diff = [k for k in range(len(base)) if k < len(other) and base[k] != other[k]]
            if len(other) != len(base) or not diff or diff != list(range(diff[0], diff[-1] + 1)) \
                    or len(diff) not in (1, 2, 4):
                raise GuestgenError(f"cannot patch {key[0]!r} field {i}: {base.hex()} vs {other.hex()}")
            places.append((diff[0], len(diff)))
        _TEMPLATES[key] = (base, tuple(places))


@dataclass
class Built:
    """What ``GuestSpec.build`` makes: the same fields as ``popek.asm.Program`` that a Guest needs."""

    image: bytes
    origin: int
    entry: int
    symbols: dict[str, int]


def link(lines: list[tuple]) -> Built:
    """Lay out and encode ``lines`` (see the line kinds above)."""
    missing = {_key(ln[1], ln[2]) for ln in lines if ln[0] == "I"} - _TEMPLATES.keys()
    if missing:
        _encode_templates(sorted(missing))
    assert lines[0][0] == "O", "a listing starts with its origin"
    origin = here = lines[0][1]
    labels: dict[str, int] = {}
    sizes = []
    for ln in lines:                                  # pass 1: addresses
        kind = ln[0]
        if kind == "I":
            size = len(_TEMPLATES[_key(ln[1], ln[2])][0])
        elif kind == "B":
            size = 5 if ln[1] in ("jmp", "call") else 6
        elif kind == "J":
            size = len(ln[1]) + 2
        elif kind == "R":
            size = len(ln[1])
        elif kind == "L":
            if ln[1] in labels:
                raise GuestgenError(f"label {ln[1]} defined twice")
            labels[ln[1]] = here
            size = 0
        else:                                         # "O"
            if ln[1] < here:
                raise GuestgenError(f".org {ln[1]:#x} is behind {here:#x}")
            size = ln[1] - here
        sizes.append(size)
        here += size
    out = bytearray()
    for ln, size in zip(lines, sizes):                # pass 2: bytes
        kind = ln[0]
        if kind == "I":
            base, places = _TEMPLATES[_key(ln[1], ln[2])]
            data = bytearray(base)
            for f, (at, n) in zip(ln[2], places):
                value = labels[f.label] if f.label is not None else f.value
                data[at:at + n] = (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
            out += data
        elif kind == "B":
            op, target = ln[1], labels[ln[2]]
            end = origin + len(out) + size
            rel = struct.pack("<i", ((target - end + 0x80000000) & 0xFFFFFFFF) - 0x80000000)
            out += (b"\xe9" if op == "jmp" else b"\xe8" if op == "call" else bytes([0x0F, JCC_OPCODE[op]])) + rel
        elif kind == "J":
            end = origin + len(out) + size
            out += ln[1] + struct.pack("<H", (ln[2] - end) & 0xFFFF)
        elif kind == "R":
            out += ln[1]
        elif kind == "O":
            out += bytes(size)
    return Built(bytes(out), origin, labels.get("_start", origin), {**SYMBOLS, **labels})


def render(lines: list[tuple]) -> str:
    out = []
    for ln in lines:
        kind = ln[0]
        if kind == "I":
            out.append("        " + ln[1].format(*(f.text for f in ln[2])))
        elif kind == "B":
            out.append(f"        {ln[1]} near {ln[2]}")
        elif kind == "J":
            out.append("        .byte " + ", ".join(f"{b:#04x}" for b in ln[1]))
            out.append(f"        .word ({ln[2]:#x} - ($ + 2)) & 0xffff")
        elif kind == "L":
            out.append(f"{ln[1]}:")
        elif kind == "R":
            out.append("        " + ln[2])
        else:
            out.append(f"        .org {ln[1]:#x}")
    return "\n".join(out) + "\n"


def _bytes_lines(data: bytes, per_line: int = 16) -> list[tuple]:
    return [("R", data[i:i + per_line], ".byte " + ", ".join(f"{b:#04x}" for b in data[i:i + per_line]))
            for i in range(0, len(data), per_line)]


# --- the guest ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    own_gdt: bool = True               # load pm.inc's GDT and a TSS (else keep the machine's boot GDT)
    idt: bool = True                   # install an IDT (needed for faults, int n and the timer)
    timer: int | None = None           # PIT divisor of a periodic IRQ 0 (1-65535), or None
    faults: bool = False               # the body may fault on purpose (#DE, #UD, #GP), handlers skip
    sti: bool = False                  # enable interrupts at the end of the prologue
    trace: bool = False                # after every item, log EFLAGS and a register (see _Renderer.block)


@dataclass(frozen=True)
class GuestSpec:
    """One generated guest. Items are tuples ``(kind, *params)``; see ``ITEMS``."""

    options: Options
    registers: tuple[int, ...]          # initial eax ebx ecx edx esi edi ebp
    scratch: bytes
    body: tuple = ()
    subs: tuple = ()                    # each (args, items): called with `args` dwords, `ret 4*args`

    @cached_property
    def lines(self) -> list[tuple]:
        return _Renderer(self).lines()

    @cached_property
    def text(self) -> str:
        return (f"; generated by popek.experiments.guestgen ({self.options})\n"
                "; origin 0xfe000 (data), _start at 0x100000; see the module docstring for the layout\n"
                + render(self.lines))

    def build(self) -> Built:
        return link(self.lines)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    def guest(self, name: str | None = None):
        """A ``popek.machine.Guest`` ready for ``run_guest``."""
        from popek.machine.guest import Guest
        built = self.build()
        return Guest(name or f"gen-{self.digest}.s", ((built.origin, built.image),), built.entry, "asm",
                     built.symbols)

    @property
    def kinds(self) -> set[str]:
        """Every item kind in the body and subroutines (for statistics and test coverage)."""
        found: set[str] = set()

        def walk(items):
            for item in items:
                found.add(item[0])
                for p in item[1:]:
                    if isinstance(p, tuple) and p and isinstance(p[0], tuple):
                        walk(p)
        walk(self.body)
        for _args, items in self.subs:
            walk(items)
        return found


class _Renderer:
    """Turns a GuestSpec into lines: the runtime around the body, the body, the data it asked for."""

    def __init__(self, spec: GuestSpec):
        self.spec, self.opt = spec, spec.options
        self.in_sub = False
        self.traced = 0
        self.code: list[tuple] = []
        self.data_ptrs: list[tuple[int, str, int]] = []      # (slot, label, selector) far pointers
        self.n = 0
        self.depth = 0                                       # dwords pushed by the current block
        self.level = 0                                       # loop nesting
        self.counter_base = 0

    # helpers ----------------------------------------------------------------------------------------------
    def i(self, template: str, *fields: Field) -> None:
        self.code.append(("I", template, fields))

    def b(self, op: str, label: str) -> None:
        self.code.append(("B", op, label))

    def label(self, name: str) -> None:
        self.code.append(("L", name))

    def new(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def farptr(self, label: str, selector: int = KCODE) -> Field:
        slot = len(self.data_ptrs)
        if slot >= FARPTR_SLOTS:
            return None
        self.data_ptrs.append((slot, label, selector))
        return addr("farptrs", 8 * slot)

    # the whole guest ----------------------------------------------------------------------------------------
    def lines(self) -> list[tuple]:
        self.label("_start")
        self.prologue()
        self.label("body")
        self.block(self.spec.body)
        self.epilogue()
        self.counter_base, self.in_sub = SUB_COUNTERS, True
        for k, (args, items) in enumerate(self.spec.subs):
            self.label(f"sub_{k}")
            self.block(items)
            if args:
                self.i("ret {}", imm(4 * args, 16))
            else:
                self.i("ret")
        self.handlers()
        return self.data() + [("O", CODE)] + self.code

    def block(self, items) -> None:
        saved, self.depth = self.depth, 0
        for item in items:
            ITEMS[item[0]][0](self, *item[1:])
            if self.opt.trace:
                self.trace()
        if self.depth:
            self.i(f"lea esp, [esp + {4 * self.depth}]")
        self.depth = saved

    def trace(self) -> None:
        """Log EFLAGS and one register into the next trace slot (a ring, checksummed with the scratch area),
        so that a difference the following instructions would overwrite (a flag lar or verr set, a
        register smsw wrote) still shows at the end. pushfd is itself sensitive: a monitor that gets
        pushf wrong diverges on every traced guest."""
        slot = self.traced % TRACE_SLOTS
        self.i("pushfd")
        self.i("pop dword ptr [{}]", addr("trace", 8 * slot))
        self.i(f"mov dword ptr [{{}}], {GPR32[self.traced % 7]}", addr("trace", 8 * slot + 4))
        self.traced += 1

    def need(self, dwords: int) -> None:
        """Make sure the current block pushed ``dwords`` before a pop takes them."""
        while self.depth < dwords:
            self.i("push {}", imm(0x5A5A0000 + self.depth))
            self.depth += 1

    # runtime ----------------------------------------------------------------------------------------------
    def prologue(self) -> None:
        opt = self.opt
        if opt.own_gdt:
            self.i("lgdt [{}]", addr("gdtr"))
            self.i("jmp far 0x08:{}", lab("reload"))
            self.label("reload")
            self.i("mov ax, 0x10")
            for seg in ("ds", "es", "fs", "gs", "ss"):
                self.i(f"mov {seg}, ax")
        self.i("mov esp, {}", absolute(STACK))
        if opt.own_gdt:
            self.i("mov ax, 0x28")
            self.i("ltr ax")
        self.i("sgdt [{}]", addr("saved_gdtr"))
        if opt.idt:
            self.i("mov edi, {}", absolute(IDT))
            self.i("mov ecx, {}", imm(IDT_VECTORS))
            self.i("mov eax, {}", lab("unexpected"))
            self.label("fill_idt")
            self.i("mov word ptr [edi], ax")
            self.i("mov word ptr [edi + 2], 0x8")
            self.i("mov word ptr [edi + 4], 0x8e00")
            self.i("ror eax, 16")
            self.i("mov word ptr [edi + 6], ax")
            self.i("ror eax, 16")
            self.i("add edi, 8")
            self.i("dec ecx")
            self.b("jne", "fill_idt")
            gates = [(0, "fault_noerr", 0x8E00), (6, "fault_noerr", 0x8E00), (13, "fault_err", 0x8E00),
                     (3, "soft_int", 0x8F00), (4, "soft_int", 0x8F00), (0x30, "soft_int", 0x8F00),
                     (0x31, "soft_int", 0x8E00)]
            if opt.timer:
                gates.append((0x20, "irq0", 0x8E00))
            for vector, handler, attr in gates:
                self.i("mov eax, {}", lab(handler))
                self.i("mov word ptr [{}], ax", absolute(IDT + 8 * vector))
                self.i("shr eax, 16")
                self.i("mov word ptr [{}], ax", absolute(IDT + 8 * vector + 6))
                self.i("mov word ptr [{}], {}", absolute(IDT + 8 * vector + 4), imm(attr, 16))
            self.i("lidt [{}]", addr("idtr"))
            if opt.timer:
                # 8259: ICW1 edge/cascade/ICW4, ICW2 vectors 0x20/0x28, ICW3, ICW4 8086; unmask IRQ 0 only.
                for port, value in ((0x20, 0x11), (0xA0, 0x11), (0x21, 0x20), (0xA1, 0x28), (0x21, 0x04),
                                    (0xA1, 0x02), (0x21, 0x01), (0xA1, 0x01), (0x21, 0xFE), (0xA1, 0xFF)):
                    self.i("mov al, {}", imm(value, 8))
                    self.i("out {}, al", imm(port, 8))
                # 8254 channel 0: lobyte/hibyte, mode 2 (rate generator), the divisor.
                for port, value in ((0x43, 0x34), (0x40, opt.timer & 0xFF), (0x40, opt.timer >> 8)):
                    self.i("mov al, {}", imm(value, 8))
                    self.i("out {}, al", imm(port, 8))
        for reg, value in zip(GPR32, self.spec.registers):
            self.i(f"mov {reg}, {{}}", imm(value))
        if opt.sti and opt.idt:
            self.i("sti")

    NAMES = (("eax", 28), ("ebx", 16), ("ecx", 24), ("edx", 20), ("esi", 4), ("edi", 0), ("ebp", 8),
             ("esp", 12), ("eflags", 32))
    COUNTERS = ("ticks", "ints", "faults", "last_error", "farcalls")

    def epilogue(self) -> None:
        self.label("epilogue")
        self.i("pushfd")
        self.i("pushad")          # [esp]: edi esi ebp esp ebx edx ecx eax, then eflags
        self.i("cli")
        self.i("cld")
        for name, offset in self.NAMES:
            self.i("mov esi, {}", addr("strings", STRINGS[name]))
            self.b("call", "print_str")
            self.i(f"mov eax, dword ptr [esp + {offset}]")
            self.b("call", "print_hex")
        self.i("xor eax, eax")
        self.i("mov esi, {}", addr("scratch"))
        self.i("mov ecx, {}", imm((SCRATCH_SIZE + 8 * TRACE_SLOTS) // 4))     # scratch, then the trace
        self.label("checksum")
        self.i("rol eax, 5")
        self.i("add eax, dword ptr [esi]")
        self.i("add esi, 4")
        self.i("dec ecx")
        self.b("jne", "checksum")
        self.i("mov esi, {}", addr("strings", STRINGS["sum"]))
        self.b("call", "print_str")
        self.b("call", "print_hex")
        for name in self.COUNTERS:
            self.i("mov esi, {}", addr("strings", STRINGS[name]))
            self.b("call", "print_str")
            self.i("mov eax, dword ptr [{}]", addr(name))
            self.b("call", "print_hex")
        self.i("mov al, 0xa")
        self.i("mov dx, 0x3f8")
        self.i("out dx, al")
        self.i("mov al, {}", imm(EXIT_OK, 8))
        self.i("out 0xf4, al")

    def handlers(self) -> None:
        # print_str: ESI -> a NUL-terminated string (DF clear). print_hex: EAX as 8 digits and a space.
        self.label("print_str")
        self.i("lodsb")
        self.i("test al, al")
        self.b("je", "print_str_done")
        self.i("mov dx, 0x3f8")
        self.i("out dx, al")
        self.b("jmp", "print_str")
        self.label("print_str_done")
        self.i("ret")
        self.label("print_hex")
        self.i("mov ecx, 8")
        self.label("print_hex_digit")
        self.i("rol eax, 4")
        self.i("mov edx, eax")
        self.i("and edx, 0xf")
        self.i("push eax")
        self.i("mov al, byte ptr [edx + {}]", addr("strings", STRINGS["hex"]))
        self.i("mov dx, 0x3f8")
        self.i("out dx, al")
        self.i("pop eax")
        self.i("dec ecx")
        self.b("jne", "print_hex_digit")
        self.i("mov al, 0x20")
        self.i("mov dx, 0x3f8")
        self.i("out dx, al")
        self.i("ret")
        # Faults the body caused on purpose: resume at [resume] (cleared), else it is unexpected.
        self.label("fault_noerr")
        self.i("push eax")
        self.b("jmp", "fault_common")
        self.label("fault_err")
        self.i("pop dword ptr [{}]", addr("last_error"))
        self.i("push eax")
        self.label("fault_common")
        self.i("inc dword ptr [{}]", addr("faults"))
        self.i("mov eax, dword ptr [{}]", addr("resume"))
        self.i("test eax, eax")
        self.b("je", "unexpected_fault")
        self.i("mov dword ptr [esp + 4], eax")
        self.i("mov dword ptr [{}], 0", addr("resume"))
        self.i("pop eax")
        self.i("iretd")
        self.label("unexpected_fault")
        self.i("pop eax")
        self.label("unexpected")
        self.i("cli")
        self.i("cld")
        self.i("mov esi, {}", addr("strings", STRINGS["unexpected"]))
        self.b("call", "print_str")
        self.i("mov eax, dword ptr [esp]")
        self.b("call", "print_hex")
        self.i("mov eax, dword ptr [esp + 4]")
        self.b("call", "print_hex")
        self.i("mov al, {}", imm(UNEXPECTED_EXIT, 8))
        self.i("out 0xf4, al")
        self.label("soft_int")
        self.i("inc dword ptr [{}]", addr("ints"))
        self.i("iretd")
        self.label("irq0")
        self.i("push eax")
        self.i("inc dword ptr [{}]", addr("ticks"))
        self.i("mov al, 0x20")
        self.i("out 0x20, al")
        self.i("pop eax")
        self.i("iretd")
        self.label("far_ret")
        self.i("inc dword ptr [{}]", addr("farcalls"))
        self.i("retf")
        self.label("far_ret8")
        self.i("inc dword ptr [{}]", addr("farcalls"))
        self.i("retf 8")

    def data(self) -> list[tuple]:
        """Every data symbol at its fixed address (SYMBOLS), in address order, with its initial contents."""
        spec = self.spec
        tss = bytearray(104)
        struct.pack_into("<II", tss, 4, STACK, KDATA)       # esp0, ss0
        struct.pack_into("<H", tss, 102, 104)               # I/O map base: no bitmap
        contents: dict[str, list[tuple]] = {
            "gdt": [("R", struct.pack("<II", GDT[k], GDT[k + 1]), f".dword {GDT[k]:#010x}, {GDT[k + 1]:#010x}")
                    for k in range(0, len(GDT), 2)] if self.opt.own_gdt else [],
            "gdtr": [("R", struct.pack("<H", len(GDT) * 4 - 1), f".word {len(GDT) * 4 - 1:#x}"),
                     ("R", struct.pack("<I", SYMBOLS["gdt"]), ".dword gdt")],
            "idtr": [("R", struct.pack("<HI", IDT_VECTORS * 8 - 1, IDT),
                      f".word {IDT_VECTORS * 8 - 1:#x}, {IDT & 0xFFFF:#x}, {IDT >> 16:#x}")],
            "tss": _bytes_lines(bytes(tss)),
            "divisor": [("R", struct.pack("<I", 7), ".dword 7")],
            "sels": [("R", struct.pack(f"<{len(SELECTORS)}H", *SELECTORS),
                      ".word " + ", ".join(f"{s:#x}" for s in SELECTORS))],
            "farptrs": [line for slot, label, selector in self.data_ptrs
                        for line in (("O", SYMBOLS["farptrs"] + 8 * slot), ("I", ".dword {}", (lab(label),)),
                                     ("R", struct.pack("<H", selector), f".word {selector:#x}"))],
            "scratch": _bytes_lines(spec.scratch),
            "strings": [line for name, offset in STRINGS.items()
                        for line in (("O", SYMBOLS["strings"] + offset),
                                     ("R", STRING_TEXT[name].encode() + b"\0", f'.asciz "{STRING_TEXT[name]}"'))],
        }
        out: list[tuple] = []
        for symbol, address in sorted(SYMBOLS.items(), key=lambda kv: kv[1]):
            out += [("O", address), ("L", symbol)] + contents.get(symbol, [])
        out.append(("O", SYMBOLS["strings"] + 0x100))
        return out


STRING_TEXT = {"hex": "0123456789abcdef", "eax": "eax=", "ebx": "ebx=", "ecx": "ecx=", "edx": "edx=",
               "esi": "esi=", "edi": "edi=", "ebp": "ebp=", "esp": "esp=", "eflags": "eflags=", "sum": "sum=",
               "ticks": "ticks=", "ints": "ints=", "faults": "faults=", "last_error": "err=",
               "farcalls": "far=", "unexpected": "!unexpected "}
STRINGS: dict[str, int] = {}
_at = 0
for _name, _text in STRING_TEXT.items():
    STRINGS[_name] = _at
    _at += len(_text) + 1
assert _at <= 0x100


# --- items: (render, strategy) per kind ---------------------------------------------------------------------
def _mem(offset: int, size: int = 4) -> Field:
    return addr("scratch", min(offset, SCRATCH_SIZE - size))


SIZE_PTR = {1: "byte", 2: "word", 4: "dword"}


def push_imm(g, value: int) -> None:
    """push imm32, avoiding 0xff80-0xffff, which Keystone 0.9.2 encodes as `push -1` (popek.asm refuses it)."""
    value &= 0xFFFFFFFF
    g.i("push {}", imm(value | 0x10000 if 0xFF80 <= value <= 0xFFFF else value))


def r_alu_rr(g, op, dst, src):
    g.i(f"{op} {dst}, {src}")


def r_alu_ri(g, op, reg, value):
    g.i(f"{op} {reg}, {{}}", imm(value))


def r_alu_small(g, op, width, dst, src, value):
    regs = GPR8 if width == 8 else GPR16
    dst, src = regs[dst % len(regs)], regs[src % len(regs)]
    if value is None:
        g.i(f"{op} {dst}, {src}")
    else:
        g.i(f"{op} {dst}, {{}}", imm(value, width))


def r_alu_mem(g, op, reg, offset, store):
    if store:
        g.i(f"{op} dword ptr [{{}}], {reg}", _mem(offset))
    else:
        g.i(f"{op} {reg}, dword ptr [{{}}]", _mem(offset))


def r_test(g, reg, src, value):
    if value is None:
        g.i(f"test {reg}, {src}")
    else:
        g.i(f"test {reg}, {{}}", imm(value))


def r_unary(g, op, reg, offset):
    if offset is None:
        g.i(f"{op} {reg}")
    else:
        g.i(f"{op} dword ptr [{{}}]", _mem(offset))


def r_shift(g, op, reg, count):
    if count == 1:
        g.i(f"{op} {reg}, 1")
    elif count is None:
        g.i(f"{op} {reg}, cl")
    else:
        g.i(f"{op} {reg}, {{}}", imm(count, 8))


def r_mul(g, form, dst, src, value):
    if form == "imul2":
        g.i(f"imul {dst}, {src}")
    elif form == "imul3":
        g.i(f"imul {dst}, {src}, {{}}", imm(value))
    else:                                 # one-operand mul/imul: EDX:EAX
        g.i(f"{form} {src}")


def r_div(g, signed, offset):
    """A division that cannot fault: EDX:EAX = 0:EAX divided by a nonzero constant."""
    g.i("xor edx, edx")
    g.i(f"{'idiv' if signed else 'div'} dword ptr [{{}}]", addr("divisor"))


def r_mov(g, form, dst, src, value):
    if form == "imm":
        g.i(f"mov {dst}, {{}}", imm(value))
    elif form == "reg":
        g.i(f"mov {dst}, {src}")
    elif form == "movzx":
        g.i(f"movzx {dst}, {GPR8[value % 8]}")
    elif form == "movsx":
        g.i(f"movsx {dst}, {GPR16[value % 7]}")
    elif form == "xchg":                  # (xchg eax, eax is nop's encoding, which popek.asm refuses)
        other = src if src != dst else GPR32[(GPR32.index(dst) + 1) % 7]
        g.i(f"xchg {dst}, {other}")
    elif form == "bswap":
        g.i(f"bswap {dst}")
    elif form == "lea":
        # (a zero displacement would lose its byte: keep it nonzero so the template's form holds)
        g.i(f"lea {dst}, [{src} + {GPR32[value % 7]}*{1 << (value >> 3 & 3)} + {{}}]", imm(value >> 5 or 1))
    elif form == "xadd":
        g.i(f"xadd {dst}, {src}")
    elif form == "cmpxchg":
        g.i(f"cmpxchg {dst}, {src}")
    else:                                 # cdq / cwde: fixed registers
        g.i(form)


def r_cc(g, form, cc, dst, src):
    if form == "set":
        g.i(f"set{cc} {GPR8[dst % 8]}")
    else:
        g.i(f"cmov{cc} {GPR32[dst % 7]}, {src}")


def r_bits(g, op, reg, src, bit):
    if op in ("bsf", "bsr"):
        g.i(f"{op} {reg}, {src}")
    else:
        g.i(f"{op} {reg}, {{}}", imm(bit, 8))


def r_flag(g, op):
    g.i(op)


def r_load(g, width, reg, offset):
    regs = {4: GPR32, 2: GPR16, 1: GPR8}[width]
    g.i(f"mov {regs[reg % len(regs)]}, {SIZE_PTR[width]} ptr [{{}}]", _mem(offset, width))


def r_store(g, width, reg, offset, value):
    if value is not None:
        g.i(f"mov {SIZE_PTR[width]} ptr [{{}}], {{}}", _mem(offset, width), imm(value, 8 * width))
        return
    regs = {4: GPR32, 2: GPR16, 1: GPR8}[width]
    g.i(f"mov {SIZE_PTR[width]} ptr [{{}}], {regs[reg % len(regs)]}", _mem(offset, width))


def r_indexed(g, index, dst, store):
    """A scratch access through a register index, masked to stay inside the area first."""
    g.i(f"and {index}, 0xfc")
    if store:
        g.i(f"mov dword ptr [{index} + {{}}], {dst}", addr("scratch"))
    else:
        g.i(f"mov {dst}, dword ptr [{index} + {{}}]", addr("scratch"))


def r_string(g, op, prefix, down, src, dst, count):
    """A string instruction with ESI/EDI/ECX set up so that it stays inside the scratch area either way."""
    prefixes = ("", "repe", "repne") if op in ("cmpsb", "scasb") else ("", "rep")
    rep = prefixes[prefix % len(prefixes)]
    width = 4 if op.endswith("d") else 1
    span = count * width
    g.i("mov esi, {}", addr("scratch", 64 + src % (SCRATCH_SIZE - 128 - width)))
    g.i("mov edi, {}", addr("scratch", 64 + dst % (SCRATCH_SIZE - 128 - width)))
    g.i("mov ecx, {}", imm(count))
    assert span <= 64
    g.i("std" if down else "cld")
    g.i(f"{rep + ' ' if rep else ''}{op}")


def r_push(g, form, reg, value):
    if form == "reg":
        g.i(f"push {reg}")
    elif form == "imm":
        push_imm(g, value)
    elif form == "mem":
        g.i("push dword ptr [{}]", _mem(value & 0xFF))
    else:
        g.i("pushad")
        g.depth += 7
    g.depth += 1


def r_pop(g, form, reg, value):
    if form == "popad":
        g.need(8)
        g.i("popad")
        g.depth -= 8
        return
    g.need(1)
    if form == "reg":
        g.i(f"pop {reg}")
    else:
        g.i("pop dword ptr [{}]", _mem(value & 0xFF))
    g.depth -= 1


def r_nop(g):
    g.i("nop")


def r_junk(g, data):
    """A jump over bytes that never run (data in code: decoders must not care)."""
    end = g.new("junk")
    g.b("jmp", end)
    g.code.extend(_bytes_lines(bytes(data)))
    g.label(end)


# control ----------------------------------------------------------------------------------------------------
def r_if(g, cc, then, otherwise):
    skip = g.new("else")
    g.b(f"j{cc}", skip)
    g.block(then)
    if otherwise is None:
        g.label(skip)
        return
    end = g.new("endif")
    g.b("jmp", end)
    g.label(skip)
    g.block(otherwise)
    g.label(end)


def r_loop(g, times, items):
    if g.level >= 2:
        g.block(items)
        return
    counter = addr("counters", 4 * (g.counter_base + g.level))
    top = g.new("loop")
    g.i("mov dword ptr [{}], {}", counter, imm(times))
    g.label(top)
    g.level += 1
    g.block(items)
    g.level -= 1
    g.i("dec dword ptr [{}]", counter)
    g.b("jne", top)


def r_call(g, which):
    subs = g.spec.subs
    if not subs or g.in_sub:                  # no subroutine, or inside one: subroutines call nothing
        return
    k = which % len(subs)
    for n in range(subs[k][0]):
        g.i("push {}", imm(0x5B5B0000 + n))
    g.b("call", f"sub_{k}")


# sensitive-unprivileged ------------------------------------------------------------------------------------
def r_store_table(g, op, offset):
    g.i(f"{op} [{{}}]", _mem(offset, 6))


def r_read_special(g, op, form, reg, offset):
    """sldt / str / smsw into a 32-bit register, a 16-bit one, or memory."""
    if form == 32:
        g.i(f"{op} {GPR32[reg % 7]}")
    elif form == 16:
        g.i(f"{op} {GPR16[reg % 7]}")
    else:
        g.i(f"{op} word ptr [{{}}]", _mem(offset, 2))


def r_pushf(g):
    g.i("pushfd")
    g.depth += 1


def r_popf(g, flags):
    g.i("push {}", imm((flags & SAFE_FLAGS) | 2))
    g.i("popfd")


def r_push_seg(g, seg):
    g.i(f"push {seg}")
    g.depth += 1


def _loadable(g, seg: str, choice: int) -> int:
    if seg == "ss":
        return KDATA
    choices = LOADABLE_DATA[g.opt.own_gdt] + ((0,) if seg in ("fs", "gs") else ())
    return choices[choice % len(choices)]


def r_pop_seg(g, seg, choice, from_seg):
    """push a valid selector (a segment register's or an immediate) and pop it into ``seg``."""
    if from_seg:
        g.i(f"push {'ds' if seg != 'ss' else 'ss'}")
    else:
        g.i("push {}", imm(_loadable(g, seg, choice)))
    g.i(f"pop {seg}")


def r_mov_from_seg(g, seg, form, reg, offset):
    if form == 32:
        g.i(f"mov {GPR32[reg % 7]}, {seg}")
    elif form == 16:
        g.i(f"mov {GPR16[reg % 7]}, {seg}")
    else:
        g.i(f"mov word ptr [{{}}], {seg}", _mem(offset, 2))


def r_mov_to_seg(g, seg, choice, reg):
    selector = _loadable(g, seg, choice)
    if reg is None:
        g.i(f"mov {seg}, word ptr [{{}}]", addr("sels", 2 * SELECTORS.index(selector)))
    else:
        g.i(f"mov {GPR16[reg % 7]}, {{}}", imm(selector, 16))
        g.i(f"mov {seg}, {GPR16[reg % 7]}")


def r_descriptor_query(g, op, reg, src, which):
    """lar / lsl / verr / verw on a random register or a selector from the table."""
    if op in ("lar", "lsl"):
        if which is None:
            g.i(f"{op} {reg}, {src}")
        else:
            g.i(f"{op} {reg}, word ptr [{{}}]", addr("sels", 2 * (which % len(SELECTORS))))
    elif which is None:
        g.i(f"{op} {GPR16[GPR32.index(src)]}")
    else:
        g.i(f"{op} word ptr [{{}}]", addr("sels", 2 * (which % len(SELECTORS))))


def r_far_jmp(g, indirect):
    target = g.new("far")
    pointer = g.farptr(target) if indirect else None
    if pointer is not None:
        g.i("jmp far [{}]", pointer)
    else:
        g.i("jmp far 0x08:{}", lab(target))
    g.label(target)


def r_far_call(g, form, a, b):
    if form == "direct":
        g.i("call far 0x08:{}", lab("far_ret"))
    elif form == "indirect" and (pointer := g.farptr("far_ret")) is not None:
        g.i("call far [{}]", pointer)
    else:                                 # two parameters, removed by `retf 8`
        push_imm(g, a)
        push_imm(g, b)
        g.i("call far 0x08:{}", lab("far_ret8"))


def r_retf(g, params, a, b):
    after = g.new("retf")
    if params:
        push_imm(g, a)
        push_imm(g, b)
    g.i("push cs")
    g.i("push {}", lab(after))
    g.i("retf 8" if params else "retf")
    g.label(after)


def r_int(g, vector):
    if not g.opt.idt:
        return
    if vector == 3:
        g.i("int3")
    elif vector == 4:
        g.i("into")                       # only traps with OF set
    else:
        g.i("int {}", imm(vector, 8))


def r_iret(g, flags):
    after = g.new("iret")
    if flags is None:
        g.i("pushfd")
    else:
        g.i("push {}", imm((flags & SAFE_FLAGS) | 2))
    g.i("push cs")
    g.i("push {}", lab(after))
    g.i("iretd")
    g.label(after)


# privileged -------------------------------------------------------------------------------------------------
def r_cli_sti(g, op):
    g.i(op)


def r_load_table(g, which):
    if which == "lidt" and g.opt.idt:
        g.i("lidt [{}]", addr("idtr"))
    elif which == "lgdt":
        g.i("lgdt [{}]", addr("gdtr" if g.opt.own_gdt else "saved_gdtr"))
    else:
        g.i("lgdt [{}]", addr("saved_gdtr"))


def r_lldt(g):
    g.i("lldt word ptr [{}]", addr("sels", 0))          # the null selector: LDTR becomes unusable, legally


def r_mov_cr(g, cr, write, reg, value):
    reg = GPR32[reg % 7]
    g.i(f"mov {reg}, cr{cr}")
    if not write:
        return
    if cr == 0:
        g.i(f"xor {reg}, {{}}", imm(CR0_TOGGLE[value % len(CR0_TOGGLE)]))
    elif cr == 4:
        g.i(f"xor {reg}, {{}}", imm(CR4_TOGGLE[value % len(CR4_TOGGLE)]))
    elif cr == 3:
        g.i(f"mov {reg}, {{}}", imm(value & 0x7FFFF000))
    else:
        g.i(f"mov {reg}, {{}}", imm(value))
    g.i(f"mov cr{cr}, {reg}")


def r_port(g, form, port, offset, count):
    if form == "out_com1":
        g.i("mov dx, 0x3f8")
        g.i("out dx, al")
    elif form == "in_lsr":
        g.i("mov dx, 0x3fd")
        g.i("in al, dx")
    elif form == "out_imm":
        g.i("out {}, al", imm(UNUSED_PORTS[port % 2], 8))     # 0x80, 0x84 fit an imm8
    elif form == "in_imm":
        g.i("in al, {}", imm(UNUSED_PORTS[port % 2], 8))
    elif form in ("in_dx16", "in_dx32", "out_dx16", "out_dx32"):
        g.i("mov dx, {}", imm(UNUSED_PORTS[port % len(UNUSED_PORTS)], 16))
        acc = "ax" if form.endswith("16") else "eax"
        g.i(f"in {acc}, dx" if form.startswith("in") else f"out dx, {acc}")
    elif form == "outs":                  # part of the scratch area to the console
        g.i("mov esi, {}", _mem(offset % 192))
        g.i("mov ecx, {}", imm(count))
        g.i("mov dx, 0x3f8")
        g.i("cld")
        g.i("rep outsb")
    else:                                 # "ins": an unused port (reads 0xff) into the scratch area
        g.i("mov edi, {}", _mem(offset % 192))
        g.i("mov ecx, {}", imm(count))
        g.i("mov dx, {}", imm(UNUSED_PORTS[port % len(UNUSED_PORTS)], 16))
        g.i("cld")
        g.i("rep insb")


def r_hlt(g):
    if g.opt.timer and g.opt.idt:
        g.i("sti")
        g.i("hlt")


def r_misc_priv(g, op, offset, value):
    if op == "invlpg":
        g.i("invlpg [{}]", _mem(offset))
    elif op == "lmsw":
        g.i("mov ax, {}", imm(value | 1, 16))
        g.i("lmsw ax")
    elif op == "cpuid":
        # (not leaf 1, nor the hypervisor leaves 0x40000000+, which value cannot reach: hvm answers them
        # differently on purpose, CPUID.1:ECX[31] and the vendor leaf)
        g.i("mov eax, {}", imm(value if value != 1 else 0))
        g.i("cpuid")
    else:                                 # clts
        g.i(op)


def r_tsc(g, op):
    """The time-stamp counter: the machine's clock, so every monitor must count the instructions before it
    exactly to read what native reads."""
    if op == "rdtscp":
        _raw(g, b"\x0f\x01\xf9")           # (not in popek asm's table)
    else:
        g.i(op)


# faults -----------------------------------------------------------------------------------------------------
FAULTS = ("div0", "idiv0", "ud2", "bad_ds", "bad_ss", "bad_far", "rpl_far", "monitor_write")


def r_fault(g, which, choice):
    if not (g.opt.faults and g.opt.idt):
        return
    after = g.new("resume")
    g.i("mov dword ptr [{}], {}", addr("resume"), lab(after))
    if which == "div0":
        g.i("div dword ptr [{}]", addr("zero"))
    elif which == "idiv0":
        g.i("idiv byte ptr [{}]", addr("zero"))
    elif which == "ud2":
        g.i("ud2")
    elif which == "bad_ds":
        seg = ("ds", "es", "fs", "gs")[choice % 4]
        g.i(f"mov {seg}, word ptr [{{}}]", addr("sels", 2 * SELECTORS.index(BAD_DATA[choice % len(BAD_DATA)])))
    elif which == "bad_ss":
        g.i("mov ss, word ptr [{}]", addr("sels", 2 * SELECTORS.index(BAD_STACK[choice % len(BAD_STACK)])))
    elif which == "bad_far":
        g.i("jmp far 0x1230:{}", lab(after))
    elif which == "rpl_far":
        g.i("jmp far 0x0b:{}", lab(after))
    else:                                 # a store into monitor memory: #GP(0) under every monitor
        g.i("mov dword ptr [{}], eax", absolute(MONITOR + 0x800 + 4 * (choice % 64)))
    g.label(after)


# adversarial control flow and memory (issue 8: each once let a guest escape or desynchronise bt) ----------
# Legacy prefixes that leave a near branch what it is: bnd (f2), rep (f3), notrack/ds (3e), cs (2e), es (26),
# ss (36), fs (64), gs (65), address size (67: a rel32 branch has no address).
BRANCH_PREFIXES = (0xF2, 0xF3, 0x3E, 0x2E, 0x26, 0x36, 0x64, 0x65, 0x67)
PREFIXED_FORMS = ("jmp", "jcc", "call", "jmp_reg", "call_reg", "ret")
# 16-bit operand-size branches truncate EIP to 16 bits: they land at PAD, below 64 KiB, which the guest
# writes first (``add esp, 2`` for the forms that pushed a 16-bit return address, then ``jmp [pad_to]``).
PAD = 0x8000
BRANCH16_FORMS = ("jmp_rel16", "call_rel16", "jcc_rel16", "jmp_ax", "call_ax", "ret16", "jcxz16", "loop16")
# Reads at the edges of what the guest may read: the last bytes of RAM (they read as RAM), across the end of
# monitor memory, into the guard page and the translation cache above it, the top of the address space
# (#GP(0) natively, so only with an IDT and faults on).
MONITOR_END = MONITOR + 0x100000    # then a guard page, then bt's translation cache
EDGE_READS = (RAM_SIZE - 4, RAM_SIZE - 2, RAM_SIZE - 1, MONITOR_END - 2, MONITOR_END - 3, MONITOR_END + 0xFFE,
              MONITOR_END + 0x1000, MONITOR_END + 0x1800, 0xFFFFFFFD)


def _raw(g, data: bytes) -> None:
    g.code.append(("R", bytes(data), ".byte " + ", ".join(f"{b:#04x}" for b in data)))


def r_prefixed_branch(g, prefix, form, cc):
    """A near branch with a prefix that does not change it (``bnd jmp``, ``notrack jmp eax``, ``ds jcc``...)."""
    end = g.new("pfx")
    pre = bytes([prefix])
    if form == "jmp":
        _raw(g, pre)
        g.b("jmp", end)
        g.i("inc ebx")                              # skipped
    elif form == "jcc":
        _raw(g, pre)
        g.b(f"j{cc}", end)
        g.i("inc ebx")
    elif form in ("call", "call_reg"):
        sub = g.new("pfx_sub")
        if form == "call":
            _raw(g, pre)
            g.b("call", sub)
        else:
            g.i("mov eax, {}", lab(sub))
            _raw(g, pre + b"\xff\xd0")              # call eax
        g.b("jmp", end)
        g.label(sub)
        g.i("inc ebx")
        _raw(g, pre + b"\xc3")                      # prefixed ret too
    elif form == "jmp_reg":
        g.i("mov eax, {}", lab(end))
        _raw(g, pre + b"\xff\xe0")                  # jmp eax
        g.i("inc ebx")
    else:                                           # ret
        g.i("push {}", lab(end))
        _raw(g, pre + b"\xc3")
        g.i("inc ebx")
    g.label(end)


def _pad(g, back: str, pushed16: bool) -> None:
    """Write the landing pad at PAD: discard a pushed 16-bit return address, then ``jmp [pad_to]`` to ``back``."""
    code = (b"\x83\xc4\x02" if pushed16 else b"\x90\x90\x90") + b"\xff\x25" + struct.pack("<I", SYMBOLS["pad_to"])
    code += b"\x90" * (12 - len(code))
    for k in range(0, 12, 4):
        g.i("mov dword ptr [{}], {}", absolute(PAD + k), imm(struct.unpack_from("<I", code, k)[0]))
    g.i("mov dword ptr [{}], {}", addr("pad_to"), lab(back))


def r_branch16(g, form, cc):
    """A branch with a 16-bit operand or address size: 66 e9/e8/0f 8x rel16, jmp/call ax, a 16-bit ret,
    67 jcxz/loop (CX, not ECX)."""
    end = g.new("b16")
    if form == "jcxz16":
        _raw(g, b"\x67\xe3\x01")                    # jcxz over the inc when CX = 0
        g.i("inc ebx")
    elif form == "loop16":
        _raw(g, b"\x67\xe2\x01")                    # loopw: CX - 1, over the inc unless CX = 0
        g.i("inc ebx")
    else:
        _pad(g, end, form in ("call_rel16", "call_ax"))
        if form == "jmp_rel16":
            g.code.append(("J", b"\x66\xe9", PAD))
        elif form == "call_rel16":
            g.code.append(("J", b"\x66\xe8", PAD))
        elif form == "jcc_rel16":
            g.code.append(("J", bytes([0x66, 0x0F, JCC_OPCODE[f"j{cc}"]]), PAD))
        elif form in ("jmp_ax", "call_ax"):
            g.i("mov eax, {}", imm(PAD))
            _raw(g, b"\x66\xff\xe0" if form == "jmp_ax" else b"\x66\xff\xd0")
        else:                                       # ret16: pops a 16-bit EIP
            g.i("sub esp, 2")
            g.i("mov word ptr [esp], {}", imm(PAD, 16))
            _raw(g, b"\x66\xc3")
        g.i("inc ebx")                              # runs only when a jcc is not taken
    g.label(end)


def r_edge_read(g, where, width):
    """A read at the edge of guest RAM, monitor memory or the translation cache (EDGE_READS)."""
    at = EDGE_READS[where % len(EDGE_READS)]
    load = {1: "movzx eax, byte ptr [{}]", 2: "movzx eax, word ptr [{}]", 4: "mov eax, dword ptr [{}]"}[width]
    if at + width <= RAM_SIZE:                      # RAM only: it reads what is there
        g.i(load, absolute(at))
        return
    if at + width <= MONITOR_END or not (g.opt.faults and g.opt.idt):
        return                  # monitor memory is readable, and what a monitor keeps there is its own
    after = g.new("resume")
    g.i("mov dword ptr [{}], {}", addr("resume"), lab(after))
    g.i(load, absolute(at))
    g.label(after)


STORE_NEXT = {"mov": "mov byte ptr [{}], bl", "adc": "adc byte ptr [{}], bl", "sbb": "sbb byte ptr [{}], bl",
              "rcl": "rcl byte ptr [{}], 1", "rcr": "rcr byte ptr [{}], 1", "rcl_cl": "rcl byte ptr [{}], cl",
              "rcr_cl": "rcr byte ptr [{}], cl"}


def r_store_next(g, value, op="mov"):
    """A store into the immediate of the next instruction (``mov ah, imm8``): in a loop, code that changes
    every iteration. The store may read the carry too (adc, sbb, rcl, rcr): Unicorn restarts a store into
    the running block, and a rerun that reads flags its first attempt wrote stores another value."""
    patch = g.new("patch")
    g.i(STORE_NEXT[op], lab(patch))
    _raw(g, b"\xb4")                                # mov ah, imm8 ...
    g.label(patch)
    _raw(g, bytes([value]))                         # ... whose imm8 the store just wrote


X87_LOADS = ("fld1", "fldz", "fldpi", "fldl2e")
X87_STORES = {"fnstenv": 28, "fnstenv16": 14, "fnsave": 108}     # bytes each writes


def r_x87_state(g, load, store, offset):
    """An x87 instruction, then a store of the x87 state into scratch: the store holds FIP, that
    instruction's EIP (which a translator that ran it elsewhere must not show). CR0.EM and CR0.TS are
    cleared first (a mov_cr item may have set them: x87 instructions would raise #UD or #NM)."""
    g.i("push eax")
    g.i("mov eax, cr0")
    g.i("and eax, 0xfffffff3")
    g.i("mov cr0, eax")
    g.i("pop eax")
    g.i(load)
    if store == "fnstenv16":
        _raw(g, b"\x66")                            # 16-bit operand size: the 14-byte environment
    g.i(f"{store.removesuffix('16')} [{{}}]", _mem(offset, X87_STORES[store]))


# --- strategies ---------------------------------------------------------------------------------------------
INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               0xFFFFFFFE, 0xFFFFFF80, 0x12345678)


def u32():
    return st.one_of(st.sampled_from(INTERESTING), st.integers(0, 0xFFFFFFFF), st.integers(0, 0x7F))


def _r32():
    return st.sampled_from(GPR32)


def _off():
    return st.integers(0, SCRATCH_SIZE - 1)


def _opt(s):
    return st.none() | s


LEAVES = {
    # innocuous
    "alu_rr": (r_alu_rr, lambda: (st.sampled_from(ALU), _r32(), _r32())),
    "alu_ri": (r_alu_ri, lambda: (st.sampled_from(ALU), _r32(), u32())),
    "alu_small": (r_alu_small, lambda: (st.sampled_from(ALU), st.sampled_from((8, 16)), st.integers(0, 7),
                                        st.integers(0, 7), _opt(st.integers(0, 0xFFFF)))),
    "alu_mem": (r_alu_mem, lambda: (st.sampled_from(ALU), _r32(), _off(), st.booleans())),
    "test": (r_test, lambda: (_r32(), _r32(), _opt(u32()))),
    "unary": (r_unary, lambda: (st.sampled_from(("inc", "dec", "neg", "not")), _r32(), _opt(_off()))),
    "shift": (r_shift, lambda: (st.sampled_from(SHIFTS), _r32(), _opt(st.integers(1, 31)))),
    "mul": (r_mul, lambda: (st.sampled_from(("imul2", "imul3", "mul", "imul")), _r32(), _r32(), u32())),
    "div": (r_div, lambda: (st.booleans(), st.just(0))),
    "mov": (r_mov, lambda: (st.sampled_from(("imm", "reg", "movzx", "movsx", "xchg", "bswap", "lea", "xadd",
                                             "cmpxchg", "cdq", "cwde")), _r32(), _r32(), u32())),
    "cc": (r_cc, lambda: (st.sampled_from(("set", "cmov")), st.sampled_from(CC), st.integers(0, 7), _r32())),
    "bits": (r_bits, lambda: (st.sampled_from(("bt", "bts", "btr", "btc", "bsf", "bsr")), _r32(), _r32(),
                              st.integers(0, 31))),
    "flag": (r_flag, lambda: (st.sampled_from(("clc", "stc", "cmc", "cld", "std", "lahf", "sahf")),)),
    "load": (r_load, lambda: (st.sampled_from((1, 2, 4)), st.integers(0, 7), _off())),
    "store": (r_store, lambda: (st.sampled_from((1, 2, 4)), st.integers(0, 7), _off(), _opt(st.integers(0, 0xFF)))),
    "indexed": (r_indexed, lambda: (_r32(), _r32(), st.booleans())),
    "string": (r_string, lambda: (st.sampled_from(("movsb", "movsd", "stosb", "stosd", "lodsb", "cmpsb", "scasb")),
                                  st.integers(0, 2), st.booleans(),
                                  st.integers(0, 255), st.integers(0, 255), st.integers(0, 16))),
    "push": (r_push, lambda: (st.sampled_from(("reg", "imm", "mem", "pushad")), _r32(), u32())),
    "pop": (r_pop, lambda: (st.sampled_from(("reg", "mem", "popad")), _r32(), u32())),
    "nop": (r_nop, lambda: ()),
    "junk": (r_junk, lambda: (st.binary(min_size=0, max_size=8),)),
    # sensitive-unprivileged
    "sgdt_sidt": (r_store_table, lambda: (st.sampled_from(("sgdt", "sidt")), _off())),
    "sldt_str_smsw": (r_read_special, lambda: (st.sampled_from(("sldt", "str", "smsw")), st.sampled_from((32, 16, 0)),
                                               st.integers(0, 6), _off())),
    "pushf": (r_pushf, lambda: ()),
    "popf": (r_popf, lambda: (u32(),)),
    "push_seg": (r_push_seg, lambda: (st.sampled_from(("cs", "ss", "ds", "es", "fs", "gs")),)),
    "pop_seg": (r_pop_seg, lambda: (st.sampled_from(("ds", "es", "fs", "gs", "ss")), st.integers(0, 3),
                                    st.booleans())),
    "mov_from_seg": (r_mov_from_seg, lambda: (st.sampled_from(("cs", "ss", "ds", "es", "fs", "gs")),
                                              st.sampled_from((32, 16, 0)), st.integers(0, 6), _off())),
    "mov_to_seg": (r_mov_to_seg, lambda: (st.sampled_from(("ds", "es", "fs", "gs", "ss")), st.integers(0, 3),
                                          _opt(st.integers(0, 6)))),
    "descriptor_query": (r_descriptor_query, lambda: (st.sampled_from(("lar", "lsl", "verr", "verw")), _r32(),
                                                      _r32(), _opt(st.integers(0, 15)))),
    "far_jmp": (r_far_jmp, lambda: (st.booleans(),)),
    "far_call": (r_far_call, lambda: (st.sampled_from(("direct", "indirect", "params")), u32(), u32())),
    "retf": (r_retf, lambda: (st.booleans(), u32(), u32())),
    "int": (r_int, lambda: (st.sampled_from((3, 4, 0x30, 0x31)),)),
    "iret": (r_iret, lambda: (_opt(u32()),)),
    # privileged and I/O
    "cli_sti": (r_cli_sti, lambda: (st.sampled_from(("cli", "sti")),)),
    "load_table": (r_load_table, lambda: (st.sampled_from(("lgdt", "lidt", "lgdt_saved")),)),
    "lldt": (r_lldt, lambda: ()),
    "mov_cr": (r_mov_cr, lambda: (st.sampled_from((0, 2, 3, 4)), st.booleans(), st.integers(0, 6), u32())),
    "port": (r_port, lambda: (st.sampled_from(("out_com1", "in_lsr", "out_imm", "in_imm", "in_dx16", "in_dx32",
                                               "out_dx16", "out_dx32", "outs", "ins")),
                              st.integers(0, 5), _off(), st.integers(0, 8))),
    "hlt": (r_hlt, lambda: ()),
    "misc_priv": (r_misc_priv, lambda: (st.sampled_from(("invlpg", "lmsw", "clts", "cpuid")), _off(),
                                        st.integers(0, 0xFFFF))),
    "tsc": (r_tsc, lambda: (st.sampled_from(("rdtsc", "rdtscp")),)),
    # faults the handlers skip
    "fault": (r_fault, lambda: (st.sampled_from(FAULTS), st.integers(0, 63))),
    # adversarial: prefixed and 16-bit branches, reads at the edges, stores into the next instruction, the x87
    # state (its FIP)
    "prefixed_branch": (r_prefixed_branch, lambda: (st.sampled_from(BRANCH_PREFIXES), st.sampled_from(PREFIXED_FORMS),
                                                    st.sampled_from(CC))),
    "branch16": (r_branch16, lambda: (st.sampled_from(BRANCH16_FORMS), st.sampled_from(CC))),
    "edge_read": (r_edge_read, lambda: (st.integers(0, len(EDGE_READS) - 1), st.sampled_from((1, 2, 4)))),
    "store_next": (r_store_next, lambda: (st.integers(0, 0xFF), st.sampled_from(tuple(STORE_NEXT)))),
    "x87_state": (r_x87_state, lambda: (st.sampled_from(X87_LOADS), st.sampled_from(tuple(X87_STORES)), _off())),
}
CONTROL = {"if": r_if, "loop": r_loop, "call": r_call}
ITEMS = {**{k: v for k, v in LEAVES.items()}, **{k: (v, None) for k, v in CONTROL.items()}}
NEEDS_IDT = {"int", "fault", "hlt"}
DEFAULT_KINDS = tuple(LEAVES)


def options(own_gdt=None, idt=None, timer=None, faults=None):
    """Guest options. Each argument fixes one choice when given: ``own_gdt``/``idt``/``faults`` a bool,
    ``timer`` False (none), True (some divisor) or a divisor."""
    def flag(value, likely):
        return st.just(value) if value is not None else st.sampled_from((True,) * likely + (False,))
    divisors = st.integers(50, 1500)
    timers = {None: st.none() | divisors, False: st.just(None), True: divisors}.get(timer, st.just(timer))
    return st.builds(Options, own_gdt=flag(own_gdt, 1), idt=flag(idt, 3), timer=timers,
                     faults=flag(faults, 1), sti=st.booleans(), trace=st.booleans()).map(_consistent)


def _consistent(o: Options) -> Options:
    """Without an IDT there is no timer, no intended fault and no sti (nothing could handle them)."""
    return o if o.idt else Options(o.own_gdt, False, None, False, False, o.trace)


# Strategies are built once per (options, kinds): building them is what costs in Hypothesis, not drawing.
@lru_cache(maxsize=None)
def leaf(idt: bool, kinds: tuple[str, ...] | None = None):
    names = [k for k in (kinds or DEFAULT_KINDS) if idt or k not in NEEDS_IDT] or ["nop"]   # (only IDT kinds asked)
    return st.one_of([st.tuples(st.just(k), *LEAVES[k][1]()) for k in names])


@lru_cache(maxsize=None)
def _block(idt: bool, depth: int, max_items: int, kinds: tuple[str, ...] | None = None, min_items: int = 0):
    """A block of items; ``depth`` bounds control-flow nesting (0: leaves only)."""
    return st.lists(_item(idt, depth, kinds), min_size=min_items, max_size=max_items).map(tuple)


@lru_cache(maxsize=None)
def _item(idt: bool, depth: int, kinds: tuple[str, ...] | None = None):
    base = leaf(idt, kinds)
    if depth <= 0:
        return base
    inner = _block(idt, depth - 1, 5, kinds)
    control = st.one_of(
        st.tuples(st.just("if"), st.sampled_from(CC), inner, _opt(inner)),
        st.tuples(st.just("loop"), st.integers(1, 4), inner),
        st.tuples(st.just("call"), st.integers(0, 2)),
    )
    # About one item in eight is control flow.
    return st.one_of(base, base, base, base, base, base, base, control)


@lru_cache(maxsize=None)
def _subs(idt: bool, kinds: tuple[str, ...] | None):
    return st.lists(st.tuples(st.integers(0, 2), _block(idt, 1, 6, kinds)), max_size=3).map(tuple)


_REGISTERS = st.tuples(*[u32()] * 7)
_SCRATCH = st.binary(min_size=SCRATCH_SIZE, max_size=SCRATCH_SIZE)


@st.composite
def guests(draw, max_items: int = 30, opts=None, kinds=None, subs: bool = True, min_items: int | None = None,
           control: bool = True):
    """A whole generated guest (``GuestSpec``) with ``min_items``..``max_items`` top-level body items (by
    default at least a sixth of the maximum, which makes Hypothesis's average about twice that). ``opts``
    is a strategy for ``Options``; ``kinds`` restricts the leaf items (names of ``LEAVES``; by default
    ``DEFAULT_KINDS``); ``control=False`` leaves out branches, loops and calls, and ``subs=False``
    subroutines."""
    o = draw(opts if opts is not None else options())
    kinds = tuple(kinds) if kinds is not None else None
    registers = draw(_REGISTERS)
    scratch = draw(_SCRATCH)
    low = max_items // 6 if min_items is None else min_items
    body = draw(_block(o.idt, 2 if control else 0, max_items, kinds, low))
    subroutines = ()
    if subs:
        subroutines = draw(_subs(o.idt, kinds))
    return GuestSpec(o, registers, scratch, body, subroutines)


# --- shrinking outside Hypothesis -----------------------------------------------------------------------------
def _blocks_of(item) -> list[int]:
    """Indexes of an item's parameters that are blocks (tuples of items)."""
    return [k for k, p in enumerate(item) if k and isinstance(p, tuple) and (not p or isinstance(p[0], tuple))]


def _smaller_blocks(items: tuple):
    """Smaller versions of a block: drop halves, then single items; inline control items; recurse."""
    n = len(items)
    size = n // 2
    while size >= 1:
        for start in range(0, n, size):
            yield items[:start] + items[start + size:]
        size //= 2
    for k, item in enumerate(items):
        inner = _blocks_of(item)
        for b in inner:                                    # replace a control item by one of its blocks
            yield items[:k] + item[b] + items[k + 1:]
        for b in inner:
            for smaller in _smaller_blocks(item[b]):
                yield items[:k] + (item[:b] + (smaller,) + item[b + 1:],) + items[k + 1:]


def simplifications(spec: GuestSpec):
    """Candidate simpler guests, simplest change first (for ``shrink``)."""
    from dataclasses import replace
    if spec.subs:
        yield replace(spec, subs=())
        for k in range(len(spec.subs)):
            yield replace(spec, subs=spec.subs[:k] + spec.subs[k + 1:])
    for body in _smaller_blocks(spec.body):
        yield replace(spec, body=body)
    for k, (args, items) in enumerate(spec.subs):
        for smaller in _smaller_blocks(items):
            yield replace(spec, subs=spec.subs[:k] + ((args, smaller),) + spec.subs[k + 1:])
    o = spec.options
    for simpler in (replace(o, trace=False), replace(o, timer=None), replace(o, faults=False),
                    replace(o, sti=False), replace(o, own_gdt=False), _consistent(replace(o, idt=False))):
        if simpler != o:
            yield replace(spec, options=simpler)
    if any(spec.registers):
        yield replace(spec, registers=(0,) * len(spec.registers))
    if any(spec.scratch):
        yield replace(spec, scratch=bytes(len(spec.scratch)))


def shrink(spec: GuestSpec, still_fails, max_tries: int = 2000) -> GuestSpec:
    """Greedy shrinking of a failing guest: take the first simplification that still fails, repeat until
    none does (or ``max_tries`` predicate calls). For failures found outside Hypothesis (``popek bench
    differential``), where Hypothesis's own shrinker cannot be asked to start from a given example."""
    tries = 0
    improved = True
    while improved and tries < max_tries:
        improved = False
        for candidate in simplifications(spec):
            tries += 1
            if still_fails(candidate):
                spec, improved = candidate, True
                break
            if tries >= max_tries:
                break
    return spec
