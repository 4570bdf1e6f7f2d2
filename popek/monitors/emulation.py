"""Emulation routines: the Popek-Goldberg "interpreter" that every deprivileging monitor shares.

One routine per instruction, in ``TABLE`` keyed by canonical name (DESIGN §3.1). A routine is
``routine(machine, vcpu, recipe) -> int``: it carries out the instruction described by ``recipe`` as the
bare machine would at the *virtual* privilege level of ``vcpu``, reading and writing the guest's registers
through the machine's raw accessors and its memory through the guest's own paging and segments, and returns
the EIP to continue at (``recipe.next`` unless it transfers control). An exception the instruction raises
at the virtual CPL is raised as ``GuestFault`` before any state changed; the caller delivers it through the
guest's virtual IDT (``popek.monitors.vcpu.deliver``). ``emulate`` is the dispatch.

Recipes. ``decode(raw, address)`` turns an instruction's bytes into a ``Recipe`` once (Capstone detail
through ``popek.decode.detail_at``, classified by ``popek.isa.classify``): canonical name, length, operand-
and address-size attributes, ``rep``, and ``Operand`` records (register names, immediates, memory operands
as segment/base/index/scale/displacement). ``Recipes`` caches them per guest address and checks the cached
bytes against guest memory on every use, so self-modifying code never runs a stale recipe. Nothing is
decoded on the hot path.

Two groups, two users:
- privileged and I/O (``lgdt`` ... ``invd``, ``rdtsc``): they fault at the deprivileged ring, so ``trap``
  runs them here when their #GP arrives;
- sensitive-unprivileged (``sgdt`` ... ``iret``): they do not fault, so ``trap`` never calls them (the
  guest sees the real machine: the divergence ``trap`` exists to show) except when one does fault at the
  real ring (an SS load with RPL 0, an ``iret`` or ``retf`` to an RPL-0 frame, anything under CR4.UMIP);
  ``bt`` calls them from its callouts. Each produces what the bare machine would at the virtual CPL.

Not modelled (the routine raises #GP, counted by the monitor): task switches (far jumps, calls and
``iret`` with NT into a TSS or task gate), virtual-8086 mode, 16-bit stack segments, segment limits (Unicorn
does not check them either). ``rdpmc`` and ``cpuid`` never trap on this machine (Unicorn: ``rdpmc`` is #UD
at every CPL; no CPUID faulting), so they have no routine; ``rdtsc`` has one for guests that set CR4.TSD.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

from capstone import x86_const as C
from unicorn.unicorn_py3.unicorn import uclib

from popek.decode import detail_at
from popek.machine import ioperm
from popek.machine.descriptors import TSS32, Descriptor
from popek.machine.faults import BP, GP, NP, OF, SOFTWARE, SS, TS, UD, GuestFault, Interrupt
from popek.machine.memory import CR0_PG, AddressSpace
from popek.monitors.vcpu import IF, IOPL, IOPL_SHIFT, NT, RF, VM, VCpu, deliver

if TYPE_CHECKING:
    from popek.machine.machine import Machine

REG, SREG, CR, DR, MEM, IMM = "reg", "sreg", "cr", "dr", "mem", "imm"
ZF, AC, ID, VIF, VIP = 1 << 6, 1 << 18, 1 << 21, 1 << 19, 1 << 20
CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_ET, CR0_NE, CR0_NW, CR0_CD = 1, 2, 4, 8, 0x10, 0x20, 1 << 29, 1 << 30
CR4_TSD, CR4_DE, CR4_UMIP = 1 << 2, 1 << 3, 1 << 11


@dataclass(frozen=True, slots=True)
class Operand:
    """One operand. REG: ``reg`` is a general register name (eax, ax, al, ah...); SREG: cs..gs; CR/DR:
    ``number``; IMM: ``number`` is the value; MEM: ``seg`` (the effective segment register), ``base``,
    ``index`` (register names or ""), ``scale``, ``disp``. ``size`` is in bytes."""

    kind: str
    size: int
    reg: str = ""
    number: int = 0
    seg: str = ""
    base: str = ""
    index: str = ""
    scale: int = 1
    disp: int = 0


@dataclass(frozen=True, slots=True)
class Recipe:
    """An instruction decoded once: what its emulation routine needs, and nothing it must decode again."""

    name: str                       # canonical name (DESIGN §3.1)
    address: int                    # EIP of the instruction
    size: int
    raw: bytes
    text: str                       # Intel syntax, for messages
    operands: tuple[Operand, ...]
    opsize: int                     # operand-size attribute, 2 or 4 bytes
    addrsize: int                   # address-size attribute, 2 or 4 bytes
    rep: bool                       # a rep/repe/repne prefix
    next: int                       # address + size


@lru_cache(maxsize=1)
def classifier():
    from popek.isa import language
    from popek.isa.classify import Classifier
    return Classifier(language.bundled(), "ia32", extended=True)


def decode(raw: bytes, address: int) -> Recipe | None:
    """The recipe for the instruction at the start of ``raw`` (32-bit code), or None if it does not decode
    or is not one the ISA description names."""
    insn = detail_at(raw, 0, address, 32)
    if insn is None:
        return None
    entry = classifier().lookup(raw, 0, 32, insn.mnemonic, insn.op_str)
    if entry is None:
        return None
    prefix = insn.prefix
    operands = tuple(_operand(insn, op) for op in insn.operands)
    return Recipe(entry.name, address, insn.size, bytes(raw[:insn.size]), f"{insn.mnemonic} {insn.op_str}".strip(),
                  operands, 2 if prefix[2] == 0x66 else 4, 2 if prefix[3] == 0x67 else 4,
                  prefix[0] in (0xF2, 0xF3), address + insn.size)


def _operand(insn, op) -> Operand:
    if op.type == C.X86_OP_IMM:
        return Operand(IMM, op.size, number=op.imm & 0xFFFFFFFF)
    if op.type == C.X86_OP_REG:
        name = insn.reg_name(op.reg)
        if name in _SREGS:
            return Operand(SREG, 2, reg=name)
        if name.startswith("cr"):
            return Operand(CR, 4, reg=name, number=int(name[2:]))
        if name.startswith("dr"):
            return Operand(DR, 4, reg=name, number=int(name[2:]))
        return Operand(REG, op.size, reg=name)
    m = op.mem
    base = insn.reg_name(m.base) if m.base else ""
    index = insn.reg_name(m.index) if m.index else ""
    seg = insn.reg_name(m.segment) if m.segment else ("ss" if base in ("esp", "ebp", "sp", "bp") else "ds")
    return Operand(MEM, op.size, seg=seg, base=base, index=index, scale=m.scale, disp=m.disp)


_SREGS = frozenset({"cs", "ds", "es", "fs", "gs", "ss"})


class Recipes:
    """Recipes by EIP, checked against the guest's bytes at CS:EIP on every use (one raw read)."""

    def __init__(self):
        # EIP -> (bytes, their length, the recipe or None when they decode to no named instruction)
        self._by_eip: dict[int, tuple[bytes, int, Recipe | None]] = {}
        self._buf = ctypes.create_string_buffer(16)
        self.decoded = 0

    def get(self, m: Machine, v: VCpu, eip: int, cs_base: int = 0) -> Recipe | None:
        """The recipe for the instruction at CS:EIP now (``cs_base``: the base of CS), or None (not
        decodable, or not one the ISA description names)."""
        linear = (cs_base + eip) & 0xFFFFFFFF
        known = self._by_eip.get(eip)
        if known is not None:
            raw, size, recipe = known
            if v.cr0 & CR0_PG:
                if _fetch(m, v, linear, size) == raw:
                    return recipe
            elif not _mem_read(m.uc._uch, linear, self._buf, size) and self._buf.raw[:size] == raw:
                return recipe           # the hot path: one raw read, 0.5 µs (through Memory.read, 1 µs)
        code = _fetch(m, v, linear, 15)
        recipe = decode(code, eip) if code else None
        if code:
            raw = recipe.raw if recipe is not None else code
            self._by_eip[eip] = (raw, len(raw), recipe)
        self.decoded += 1
        return recipe


_mem_read = uclib.uc_mem_read


def _fetch(m: Machine, v: VCpu, linear: int, size: int) -> bytes:
    """Up to ``size`` bytes of code at ``linear`` (fewer at the end of readable memory)."""
    while size:
        try:
            if v.cr0 & CR0_PG:
                return v.space(m).read(linear, size)
            return m.memory.read(linear, size)
        except GuestFault:
            size -= 1
    return b""


def emulate(m: Machine, v: VCpu, r: Recipe) -> int:
    """Run ``r`` against ``v``; the EIP to continue at. Precondition: ``r.name in TABLE``."""
    return TABLE[r.name](m, v, r)


# --- registers, memory and the stack --------------------------------------------------------------------
_SUB = {}
for _r in "abcd":
    _SUB[f"{_r}l"], _SUB[f"{_r}h"], _SUB[f"{_r}x"] = (f"e{_r}x", 0, 0xFF), (f"e{_r}x", 8, 0xFF), (f"e{_r}x", 0, 0xFFFF)
for _r in ("si", "di", "sp", "bp"):
    _SUB[_r] = (f"e{_r}", 0, 0xFFFF)


def get_reg(m: Machine, name: str) -> int:
    sub = _SUB.get(name)
    if sub is None:
        return m.reg(name)
    full, shift, mask = sub
    return (m.reg(full) >> shift) & mask


def set_reg(m: Machine, name: str, value: int) -> None:
    sub = _SUB.get(name)
    if sub is None:
        m.set_reg(name, value & 0xFFFFFFFF)
        return
    full, shift, mask = sub
    m.set_reg(full, (m.reg(full) & ~(mask << shift)) | ((value & mask) << shift))


def address(m: Machine, v: VCpu, r: Recipe, op: Operand, space: AddressSpace) -> int:
    """The linear address of a memory operand."""
    offset = op.disp
    if op.base:
        offset += get_reg(m, op.base)
    if op.index:
        offset += get_reg(m, op.index) * op.scale
    offset &= 0xFFFFFFFF if r.addrsize == 4 else 0xFFFF
    return (v.segment_base(m, space, m.reg(op.seg)) + offset) & 0xFFFFFFFF


def read(m: Machine, v: VCpu, r: Recipe, op: Operand, space: AddressSpace, size: int | None = None) -> int:
    size = size or op.size
    if op.kind == MEM:
        return int.from_bytes(space.read(address(m, v, r, op, space), size), "little")
    if op.kind == IMM:
        return op.number
    if op.kind == SREG:
        return m.reg(op.reg)
    return get_reg(m, op.reg) & ((1 << (8 * size)) - 1)


def write(m: Machine, v: VCpu, r: Recipe, op: Operand, value: int, space: AddressSpace,
          size: int | None = None) -> None:
    size = size or op.size
    if op.kind == MEM:
        space.write(address(m, v, r, op, space), (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
    else:
        set_reg(m, op.reg, value)


def _stack_base(m: Machine, v: VCpu, space: AddressSpace) -> int:
    return v.segment_base(m, space, m.reg("ss"))


def push(m: Machine, v: VCpu, space: AddressSpace, words: list[int], width: int) -> None:
    """Push ``words`` in order (the last ends up on top); a fault leaves ESP unchanged (#SS(0))."""
    esp = (m.reg("esp") - width * len(words)) & 0xFFFFFFFF
    mask = (1 << (8 * width)) - 1
    data = struct.pack(f"<{len(words)}{'I' if width == 4 else 'H'}", *(w & mask for w in reversed(words)))
    space.write((_stack_base(m, v, space) + esp) & 0xFFFFFFFF, data, fault=(SS, 0))
    m.set_reg("esp", esp)


def peek(m: Machine, v: VCpu, space: AddressSpace, count: int, width: int, skip: int = 0) -> list[int]:
    """``count`` stack slots from ESP + ``skip`` bytes, top first; ESP is not changed."""
    at = (_stack_base(m, v, space) + m.reg("esp") + skip) & 0xFFFFFFFF
    try:
        data = space.read(at, count * width)
    except GuestFault as fault:
        raise GuestFault(SS, 0, fault.why, fault.address) from None
    return list(struct.unpack(f"<{count}{'I' if width == 4 else 'H'}", data))


def _flags(m: Machine, set_mask: int = 0, clear_mask: int = 0) -> None:
    m.set_reg("eflags", (m.reg("eflags") & ~clear_mask) | set_mask)


def _zf(m: Machine, ok: bool) -> None:
    _flags(m, ZF, 0) if ok else _flags(m, 0, ZF)


# --- privilege checks --------------------------------------------------------------------------------------
def _cpl0(v: VCpu, r: Recipe) -> None:
    if v.cpl:
        raise GuestFault(GP, 0, f"{r.name} at CPL {v.cpl}")


def _iopl(v: VCpu, r: Recipe) -> None:
    if v.cpl > v.iopl:
        raise GuestFault(GP, 0, f"{r.name} at CPL {v.cpl} > IOPL {v.iopl}")


def _umip(v: VCpu, r: Recipe) -> None:
    if v.cr4 & CR4_UMIP and v.cpl:
        raise GuestFault(GP, 0, f"{r.name} at CPL {v.cpl} with CR4.UMIP")


def _io_allowed(m: Machine, v: VCpu, port: int, size: int) -> None:
    if v.cpl > v.iopl and not ioperm.bitmap_allows(v.space(m), tuple(v.tr), port, size):
        raise GuestFault(GP, 0, f"port {port:#x} at CPL {v.cpl} > IOPL {v.iopl}")


# --- privileged: descriptor tables, control and debug registers, caches, MSRs -----------------------------
def _load_table(m: Machine, v: VCpu, r: Recipe) -> tuple[int, int]:
    _cpl0(v, r)
    space = v.space(m)
    limit, base = struct.unpack("<HI", space.read(address(m, v, r, r.operands[0], space), 6))
    return base & (0xFFFFFFFF if r.opsize == 4 else 0xFFFFFF), limit


def lgdt(m: Machine, v: VCpu, r: Recipe) -> int:
    v.gdtr = _load_table(m, v, r)
    v.changed("gdtr")
    return r.next


def lidt(m: Machine, v: VCpu, r: Recipe) -> int:
    v.idtr = _load_table(m, v, r)
    v.changed("idtr")
    return r.next


def _system_descriptor(m: Machine, v: VCpu, space: AddressSpace, selector: int) -> tuple[Descriptor, int]:
    """The GDT entry for lldt/ltr; #GP(selector) for an LDT selector or one beyond the GDT."""
    if selector & 4:
        raise GuestFault(GP, selector & 0xFFFC, f"selector {selector:#x} is in the LDT")
    at = space.descriptor_address(selector, GP, selector & 0xFFFC)
    return Descriptor.from_bytes(space.read(at, 8)), at


def lldt(m: Machine, v: VCpu, r: Recipe) -> int:
    _cpl0(v, r)
    space = v.space(m)
    selector = read(m, v, r, r.operands[0], space, 2)
    if selector & 0xFFFC == 0:
        v.ldtr = type(v.ldtr)(selector, 0, 0)
    else:
        desc, _ = _system_descriptor(m, v, space, selector)
        if not desc.system or desc.type != 2:
            raise GuestFault(GP, selector & 0xFFFC, f"selector {selector:#x} is not an LDT")
        if not desc.present:
            raise GuestFault(NP, selector & 0xFFFC, f"LDT {selector:#x} not present")
        v.ldtr = type(v.ldtr)(selector, desc.base, desc.limit)
    v.changed("ldtr")
    return r.next


def ltr(m: Machine, v: VCpu, r: Recipe) -> int:
    _cpl0(v, r)
    space = v.space(m)
    selector = read(m, v, r, r.operands[0], space, 2)
    if selector & 0xFFFC == 0:
        # The bare machine (Unicorn, after QEMU) loads an invalid TR here; the SDM says #GP(0).
        v.tr = type(v.tr)(selector, 0, 0)
        v.changed("tr")
        return r.next
    desc, at = _system_descriptor(m, v, space, selector)
    if not desc.system or desc.type not in (1, 9):
        raise GuestFault(GP, selector & 0xFFFC, f"selector {selector:#x} is not an available TSS")
    if not desc.present:
        raise GuestFault(NP, selector & 0xFFFC, f"TSS {selector:#x} not present")
    space.write(at + 4, struct.pack("<I", desc.high | (2 << 8)))       # busy, as the CPU marks it
    v.tr = type(v.tr)(selector, desc.base, desc.limit)
    v.changed("tr")
    return r.next


def _set_cr0(v: VCpu, value: int) -> None:
    # ET is hardwired to 1. The bare machine (Unicorn) accepts NW without CD and reserved bits; it does
    # not check PG without PE either, and ends up in a state it cannot run: that one is the SDM's #GP(0).
    value = (value | CR0_ET) & 0xFFFFFFFF
    if value & CR0_PG and not value & CR0_PE:
        raise GuestFault(GP, 0, "CR0.PG without CR0.PE")
    v.cr0 = value
    v.changed("cr0")


def lmsw(m: Machine, v: VCpu, r: Recipe) -> int:
    _cpl0(v, r)
    value = read(m, v, r, r.operands[0], v.space(m), 2)
    # Only PE, MP, EM and TS; PE can be set but not cleared.
    _set_cr0(v, (v.cr0 & ~0xE) | (value & 0xF) | (v.cr0 & CR0_PE))
    return r.next


def clts(m: Machine, v: VCpu, r: Recipe) -> int:
    _cpl0(v, r)
    _set_cr0(v, v.cr0 & ~CR0_TS)
    return r.next


def mov_cr(m: Machine, v: VCpu, r: Recipe) -> int:
    _cpl0(v, r)
    dst, src = r.operands
    if dst.kind == CR:
        value = get_reg(m, src.reg)
        if dst.number == 0:
            _set_cr0(v, value)
        elif dst.number == 2:
            v.cr2 = value
            v.changed("cr2")
        elif dst.number == 3:
            v.cr3 = value
            v.changed("cr3")
        elif dst.number == 4:
            v.cr4 = value                       # the bare machine keeps reserved bits too (measured)
            v.changed("cr4")
        else:
            raise GuestFault(UD, None, f"no CR{dst.number}")
    else:
        value = {0: v.cr0, 2: v.cr2, 3: v.cr3, 4: v.cr4}.get(src.number)
        if value is None:
            raise GuestFault(UD, None, f"no CR{src.number}")
        set_reg(m, dst.reg, value)
    return r.next


def _dr_index(v: VCpu, n: int) -> int:
    if n in (4, 5):
        if v.cr4 & CR4_DE:
            raise GuestFault(UD, None, f"DR{n} with CR4.DE")
        return n + 2
    return n


def mov_dr(m: Machine, v: VCpu, r: Recipe) -> int:
    _cpl0(v, r)
    dst, src = r.operands
    if dst.kind == DR:
        n = _dr_index(v, dst.number)
        value = get_reg(m, src.reg)
        # DR6 and DR7 keep their always-one bits (Unicorn, measured).
        v.dr[n] = value | 0xFFFF0FF0 if n == 6 else value | 0x400 if n == 7 else value
    else:
        set_reg(m, dst.reg, v.dr[_dr_index(v, src.number)])
    return r.next


def invlpg(m: Machine, v: VCpu, r: Recipe) -> int:
    _cpl0(v, r)
    v.changed("tlb")
    return r.next


def _cache(m: Machine, v: VCpu, r: Recipe) -> int:
    """wbinvd, invd: no caches are modelled; only the privilege check remains."""
    _cpl0(v, r)
    return r.next


def _msr_value(m: Machine, v: VCpu, number: int) -> int:
    value = v.msr.get(number)
    return m.uc.msr_read(number) if value is None else value


def rdmsr(m: Machine, v: VCpu, r: Recipe) -> int:
    _cpl0(v, r)
    value = _msr_value(m, v, m.reg("ecx"))
    m.set_reg("eax", value & 0xFFFFFFFF)
    m.set_reg("edx", (value >> 32) & 0xFFFFFFFF)
    return r.next


def wrmsr(m: Machine, v: VCpu, r: Recipe) -> int:
    # Kept virtual: the SYSENTER MSRs, for one, must not reach the real CPU, which would enter ring 0.
    _cpl0(v, r)
    v.msr[m.reg("ecx")] = (m.reg("edx") << 32) | m.reg("eax")
    return r.next


def rdtsc(m: Machine, v: VCpu, r: Recipe) -> int:
    """Traps only when the guest sets CR4.TSD. The count is the machine's time (one tick per guest
    instruction, as the PIT counts), deterministic where Unicorn's own TSC follows the host clock."""
    if v.cr4 & CR4_TSD:
        _cpl0(v, r)
    value = m.now() & 0xFFFFFFFFFFFFFFFF
    m.set_reg("eax", value & 0xFFFFFFFF)
    m.set_reg("edx", (value >> 32) & 0xFFFFFFFF)
    return r.next


def hlt(m: Machine, v: VCpu, r: Recipe) -> int:
    _cpl0(v, r)
    m.halt()            # the run loop waits for an interrupt the virtual IF allows, or ends the run
    return r.next


def cli(m: Machine, v: VCpu, r: Recipe) -> int:
    _iopl(v, r)
    v.iflag = 0
    if not v.ring:
        _flags(m, 0, IF)
    return r.next


def sti(m: Machine, v: VCpu, r: Recipe) -> int:
    _iopl(v, r)
    v.iflag = 1
    if not v.ring:
        _flags(m, IF)
    return r.next


# --- port I/O ---------------------------------------------------------------------------------------------
def _port(m: Machine, op: Operand) -> int:
    return op.number if op.kind == IMM else m.reg("edx") & 0xFFFF


def in_(m: Machine, v: VCpu, r: Recipe) -> int:
    dst, src = r.operands
    port = _port(m, src)
    _io_allowed(m, v, port, dst.size)
    set_reg(m, dst.reg, m.port_read(port, dst.size))
    return r.next


def out(m: Machine, v: VCpu, r: Recipe) -> int:
    dst, src = r.operands
    port = _port(m, dst)
    _io_allowed(m, v, port, src.size)
    m.port_write(port, src.size, get_reg(m, src.reg))
    return r.next


def _string_io(m: Machine, v: VCpu, r: Recipe, inbound: bool) -> int:
    mem = r.operands[0] if inbound else r.operands[1]
    size, port = mem.size, m.reg("edx") & 0xFFFF
    _io_allowed(m, v, port, size)
    space = v.space(m)
    index = "edi" if inbound else "esi"
    step = -size if m.reg("eflags") & (1 << 10) else size
    mask = 0xFFFFFFFF if r.addrsize == 4 else 0xFFFF
    count = (m.reg("ecx") & mask) if r.rep else 1
    base = v.segment_base(m, space, m.reg(mem.seg))
    pointer = m.reg(index)
    while count:
        at = (base + (pointer & mask)) & 0xFFFFFFFF
        if inbound:
            space.write(at, m.port_read(port, size).to_bytes(size, "little"))
        else:
            m.port_write(port, size, int.from_bytes(space.read(at, size), "little"))
        pointer = (pointer & ~mask) | ((pointer + step) & mask)
        m.set_reg(index, pointer)
        count -= 1
        if r.rep:
            m.set_reg("ecx", (m.reg("ecx") & ~mask) | count)
    return r.next


def ins(m: Machine, v: VCpu, r: Recipe) -> int:
    return _string_io(m, v, r, True)


def outs(m: Machine, v: VCpu, r: Recipe) -> int:
    return _string_io(m, v, r, False)


# --- sensitive registers: the stores and the flags ------------------------------------------------------------
def _store_table(m: Machine, v: VCpu, r: Recipe, table: tuple[int, int]) -> int:
    _umip(v, r)
    space = v.space(m)
    base, limit = table
    space.write(address(m, v, r, r.operands[0], space), struct.pack("<HI", limit & 0xFFFF, base))
    return r.next


def sgdt(m: Machine, v: VCpu, r: Recipe) -> int:
    return _store_table(m, v, r, v.gdtr)


def sidt(m: Machine, v: VCpu, r: Recipe) -> int:
    return _store_table(m, v, r, v.idtr)


def _store_word(m: Machine, v: VCpu, r: Recipe, value: int) -> int:
    """sldt/str/smsw: a register destination takes the value zero-extended to its size (a 16-bit
    register keeps its upper half); memory takes 16 bits."""
    _umip(v, r)
    op = r.operands[0]
    write(m, v, r, op, value, v.space(m), 2 if op.kind == MEM else op.size)
    return r.next


def sldt(m: Machine, v: VCpu, r: Recipe) -> int:
    return _store_word(m, v, r, v.ldtr.selector & 0xFFFF)


def str_(m: Machine, v: VCpu, r: Recipe) -> int:
    return _store_word(m, v, r, v.tr.selector & 0xFFFF)


def smsw(m: Machine, v: VCpu, r: Recipe) -> int:
    op = r.operands[0]
    return _store_word(m, v, r, v.cr0 if op.kind == REG and op.size == 4 else v.cr0 & 0xFFFF)


def pushf(m: Machine, v: VCpu, r: Recipe) -> int:
    value = v.eflags(m.reg("eflags")) & ~(RF | VM)
    push(m, v, v.space(m), [value], r.opsize)
    return r.next


# POPF (SDM Vol. 2B): what a popped EFLAGS may change, by privilege. RF is cleared; VM, VIP, VIF are kept.
_POPF_ALWAYS = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 0x800 | NT | AC | ID


def popf(m: Machine, v: VCpu, r: Recipe) -> int:
    (value,) = peek(m, v, v.space(m), 1, r.opsize)
    changeable = _POPF_ALWAYS | (IF if v.cpl <= v.iopl else 0) | (IOPL if v.cpl == 0 else 0)
    if r.opsize == 2:
        changeable &= 0xFFFF
    old = v.eflags(m.reg("eflags"))
    new = ((old & ~changeable) | (value & changeable) | 2) & ~RF
    m.set_reg("esp", (m.reg("esp") + r.opsize) & 0xFFFFFFFF)
    m.set_reg("eflags", v.set_eflags(new))
    return r.next


# --- segment registers -------------------------------------------------------------------------------------
def _visible(v: VCpu, sreg: str, selector: int) -> int:
    """What the guest reads from a segment register: CS and SS carry its virtual CPL."""
    return (selector & 0xFFFC) | v.cpl if sreg in ("cs", "ss") else selector


def push_seg(m: Machine, v: VCpu, r: Recipe) -> int:
    sreg = r.operands[0].reg
    push(m, v, v.space(m), [_visible(v, sreg, m.reg(sreg))], r.opsize)
    return r.next


def mov_from_seg(m: Machine, v: VCpu, r: Recipe) -> int:
    dst, src = r.operands
    value = _visible(v, src.reg, m.reg(src.reg))
    write(m, v, r, dst, value, v.space(m), 2 if dst.kind == MEM else dst.size)
    return r.next


def check_segment(m: Machine, v: VCpu, space: AddressSpace, sreg: str, selector: int) -> Descriptor | None:
    """The checks of MOV/POP to a segment register at the virtual CPL (SDM Vol. 2A MOV, "IF SS is loaded"
    and "IF DS, ES, FS, or GS is loaded"); the descriptor, or None for a null selector in DS-GS."""
    error = selector & 0xFFFC
    if sreg == "cs":
        raise GuestFault(UD, None, "mov to CS")
    if error == 0 and not selector & 4:
        if sreg == "ss":
            raise GuestFault(GP, 0, "null selector loaded into SS")
        return None
    desc = space.descriptor(selector, GP, error)
    rpl, dpl = selector & 3, desc.dpl
    if sreg == "ss":
        if rpl != v.cpl or dpl != v.cpl or not desc.writable_data:
            raise GuestFault(GP, error, f"selector {selector:#x} is not a writable DPL-{v.cpl} stack")
        if not desc.present:
            raise GuestFault(SS, error, f"stack segment {selector:#x} not present")
        return desc
    readable = desc.is_code and desc.type & 2
    if desc.system or (desc.is_code and not readable):
        raise GuestFault(GP, error, f"selector {selector:#x} is not data or readable code")
    if not desc.conforming and (rpl > dpl or v.cpl > dpl):
        raise GuestFault(GP, error, f"selector {selector:#x}: DPL {dpl} < max(CPL {v.cpl}, RPL {rpl})")
    if not desc.present:
        raise GuestFault(NP, error, f"segment {selector:#x} not present")
    return desc


def load_segment(m: Machine, v: VCpu, sreg: str, selector: int) -> None:
    """Load a checked selector into the real register (SS with the real ring as its RPL)."""
    m.set_reg(sreg, v.real_selector(selector, v.cpl) if sreg == "ss" else selector)


def mov_to_seg(m: Machine, v: VCpu, r: Recipe) -> int:
    dst, src = r.operands
    space = v.space(m)
    selector = read(m, v, r, src, space, 2)
    check_segment(m, v, space, dst.reg, selector)
    load_segment(m, v, dst.reg, selector)
    return r.next


def pop_seg(m: Machine, v: VCpu, r: Recipe) -> int:
    sreg = r.operands[0].reg
    space = v.space(m)
    (selector,) = peek(m, v, space, 1, r.opsize)
    selector &= 0xFFFF
    check_segment(m, v, space, sreg, selector)
    m.set_reg("esp", (m.reg("esp") + r.opsize) & 0xFFFFFFFF)
    load_segment(m, v, sreg, selector)
    return r.next


# --- lar, lsl, verr, verw: the guest's own descriptors at the virtual CPL --------------------------------------
_LAR_SYSTEM = frozenset({1, 2, 3, 4, 5, 9, 11, 12})
_LSL_SYSTEM = frozenset({1, 2, 3, 9, 11})


def _visible_descriptor(m: Machine, v: VCpu, space: AddressSpace, selector: int,
                        system_types: frozenset[int] = frozenset()) -> Descriptor | None:
    """The descriptor if the CPU would let the program see it (ZF=1), else None (ZF=0)."""
    if selector & 0xFFFC == 0 and not selector & 4:
        return None
    try:
        at = space.descriptor_address(selector, GP, 0)
    except GuestFault:
        return None                             # beyond the table limit: ZF = 0, no fault
    desc = Descriptor.from_bytes(space.read(at, 8))
    if desc.system and desc.type not in system_types:
        return None
    if not desc.conforming and desc.dpl < max(v.cpl, selector & 3):
        return None
    return desc


def lar(m: Machine, v: VCpu, r: Recipe) -> int:
    dst, src = r.operands
    space = v.space(m)
    desc = _visible_descriptor(m, v, space, read(m, v, r, src, space, 2), _LAR_SYSTEM)
    if desc is not None:
        set_reg(m, dst.reg, desc.high & (0x00F0FF00 if dst.size == 4 else 0xFF00))
    _zf(m, desc is not None)
    return r.next


def lsl(m: Machine, v: VCpu, r: Recipe) -> int:
    dst, src = r.operands
    space = v.space(m)
    desc = _visible_descriptor(m, v, space, read(m, v, r, src, space, 2), _LSL_SYSTEM)
    if desc is not None:
        set_reg(m, dst.reg, desc.limit)
    _zf(m, desc is not None)
    return r.next


def _verify(m: Machine, v: VCpu, r: Recipe, writing: bool) -> int:
    space = v.space(m)
    desc = _visible_descriptor(m, v, space, read(m, v, r, r.operands[0], space, 2))
    if desc is not None:
        ok = desc.writable_data if writing else (not desc.is_code or bool(desc.type & 2))
    else:
        ok = False
    _zf(m, ok)
    return r.next


def verr(m: Machine, v: VCpu, r: Recipe) -> int:
    return _verify(m, v, r, False)


def verw(m: Machine, v: VCpu, r: Recipe) -> int:
    return _verify(m, v, r, True)


# --- control transfers through segments: far jmp/call/ret, int, iret ----------------------------------------
CALL_GATES = frozenset({4, 12})


def _far_pointer(m: Machine, v: VCpu, r: Recipe, space: AddressSpace) -> tuple[int, int]:
    """(selector, offset) of a direct ptr16:16/32 or an indirect m16:16/32 operand."""
    ops = r.operands
    if ops[0].kind == IMM:
        return ops[0].number & 0xFFFF, ops[1].number
    at = address(m, v, r, ops[0], space)
    width = r.opsize
    raw = space.read(at, width + 2)
    return int.from_bytes(raw[width:], "little"), int.from_bytes(raw[:width], "little")


def _code_target(space: AddressSpace, selector: int, cpl: int) -> Descriptor:
    """A code segment a jmp/call may reach directly at ``cpl``: SDM JMP/CALL, "far ... to a code segment"."""
    desc = space.descriptor(selector, GP, selector & 0xFFFC)
    if not desc.is_code:
        raise GuestFault(GP, selector & 0xFFFC, f"{selector:#x} is not a code segment")
    if desc.conforming:
        if desc.dpl > cpl:
            raise GuestFault(GP, selector & 0xFFFC, f"conforming {selector:#x}: DPL {desc.dpl} > CPL {cpl}")
    elif selector & 3 > cpl or desc.dpl != cpl:
        raise GuestFault(GP, selector & 0xFFFC, f"{selector:#x}: RPL/DPL do not match CPL {cpl}")
    if not desc.present:
        raise GuestFault(NP, selector & 0xFFFC, f"code segment {selector:#x} not present")
    return desc


def _far_target(m: Machine, v: VCpu, r: Recipe, space: AddressSpace):
    """Resolve a far jmp/call: ("code", selector, offset) or ("gate", gate descriptor, target code)."""
    selector, offset = _far_pointer(m, v, r, space)
    if selector & 0xFFFC == 0 and not selector & 4:
        raise GuestFault(GP, 0, "far transfer to a null selector")
    desc = space.descriptor(selector, GP, selector & 0xFFFC)
    if not desc.system:
        _code_target(space, selector, v.cpl)
        return "code", selector, offset & (0xFFFFFFFF if r.opsize == 4 else 0xFFFF), None
    if desc.type not in CALL_GATES:
        raise GuestFault(GP, selector & 0xFFFC, f"far transfer to system descriptor type {desc.type} "
                                                "(task switches are not modelled)")
    if desc.dpl < max(v.cpl, selector & 3):
        raise GuestFault(GP, selector & 0xFFFC, f"call gate {selector:#x}: DPL {desc.dpl} too low")
    if not desc.present:
        raise GuestFault(NP, selector & 0xFFFC, f"call gate {selector:#x} not present")
    target = desc.selector
    if target & 0xFFFC == 0:
        raise GuestFault(GP, 0, "null selector in a call gate")
    code = space.descriptor(target, GP, target & 0xFFFC)
    if not code.is_code or code.dpl > v.cpl:
        raise GuestFault(GP, target & 0xFFFC, f"call gate target {target:#x} is not code at DPL <= CPL")
    if not code.present:
        raise GuestFault(NP, target & 0xFFFC, f"call gate target {target:#x} not present")
    offset = desc.offset if desc.type == 12 else desc.offset & 0xFFFF
    return "gate", target, offset, (desc, code)


def _enter(m: Machine, v: VCpu, cs: int, eip: int, cpl: int, esp: int | None = None, ss: int | None = None,
           eflags: int | None = None) -> int:
    """Load CS:EIP (and SS:ESP, EFLAGS) for guest privilege ``cpl``; the virtual CPL follows."""
    real = v.real_cpl(cpl)
    kept = _accessed_bits(m, v, (cs, ss)) if not v.ring else ()
    m.enter(cs=(cs & 0xFFFC) | real, eip=eip, eflags=m.reg("eflags") if eflags is None else eflags,
            esp=m.reg("esp") if esp is None else esp, cpl=real,
            ss=None if ss is None else (ss & 0xFFFC) | real)
    for at, high in kept:
        m.memory.write(at, struct.pack("<I", high))
    v.cpl = cpl
    return eip


def _accessed_bits(m: Machine, v: VCpu, selectors) -> list[tuple[int, int]]:
    """(physical address, high dword) of guest descriptors in RAM whose accessed bit is clear.

    Only for a vcpu without deprivileging, whose real tables are the guest's: Unicorn's API sets the bit
    when it loads a selector, but its far jmp/call/ret and iret do not (measured), so it is put back."""
    space, kept = v.space(m), []
    for selector in selectors:
        if selector is None or selector & 0xFFFC == 0:
            continue
        at = space.physical(space.descriptor_address(selector, GP, 0) + 4, 4)
        high = m.memory.u32(at)
        if not high & (1 << 8) and m.memory.in_ram(at, 4):
            kept.append((at, high))
    return kept


def jmp_far(m: Machine, v: VCpu, r: Recipe) -> int:
    space = v.space(m)
    _kind, selector, offset, gate = _far_target(m, v, r, space)
    if gate is not None:
        code = gate[1]
        if (not code.conforming and code.dpl != v.cpl) or code.dpl > v.cpl:
            raise GuestFault(GP, selector & 0xFFFC, "jmp through a call gate cannot change privilege")
    return _enter(m, v, selector, offset, v.cpl)


def call_far(m: Machine, v: VCpu, r: Recipe) -> int:
    space = v.space(m)
    _kind, selector, offset, gate = _far_target(m, v, r, space)
    cs = (m.reg("cs") & 0xFFFC) | v.cpl
    if gate is None or gate[1].conforming or gate[1].dpl == v.cpl:
        width = r.opsize if gate is None else (4 if gate[0].type == 12 else 2)
        push(m, v, space, [cs, r.next], width)
        return _enter(m, v, selector, offset, v.cpl)
    # Through a call gate to more privileged code: the new stack from the TSS, then the old SS:ESP, the
    # gate's parameter count of words from the old stack, and the return address (SDM CALL).
    desc, code = gate
    width = 4 if desc.type == 12 else 2
    new_cpl = code.dpl
    new_ss, new_esp = v.tss_stack(space, new_cpl, 0)
    if new_ss & 0xFFFC == 0:
        raise GuestFault(TS, 0, f"null ring-{new_cpl} stack selector in the TSS")
    stack = space.descriptor(new_ss, TS, new_ss & 0xFFFC)
    if new_ss & 3 != new_cpl or stack.dpl != new_cpl or not stack.writable_data:
        raise GuestFault(TS, new_ss & 0xFFFC, f"TSS ring-{new_cpl} stack {new_ss:#x} unusable")
    if not stack.present:
        raise GuestFault(SS, new_ss & 0xFFFC, f"TSS ring-{new_cpl} stack {new_ss:#x} not present")
    count = desc.high & 0x1F
    params = peek(m, v, space, count, width) if count else []
    old_ss, old_esp = (m.reg("ss") & 0xFFFC) | v.cpl, m.reg("esp")
    words = [old_ss, old_esp] + list(reversed(params)) + [cs, r.next]
    new_esp = (new_esp - width * len(words)) & 0xFFFFFFFF
    mask = (1 << (8 * width)) - 1
    data = struct.pack(f"<{len(words)}{'I' if width == 4 else 'H'}", *(w & mask for w in reversed(words)))
    space.write((stack.base + new_esp) & 0xFFFFFFFF, data, fault=(SS, new_ss & 0xFFFC))
    return _enter(m, v, selector, offset, new_cpl, esp=new_esp, ss=new_ss)


def _return_target(space: AddressSpace, selector: int, cpl: int) -> Descriptor:
    """The code segment a retf/iret returns to (SDM RET, IRET: "return to ... privilege level")."""
    error = selector & 0xFFFC
    if error == 0 and not selector & 4:
        raise GuestFault(GP, 0, "return to a null selector")
    rpl = selector & 3
    if rpl < cpl:
        raise GuestFault(GP, error, f"return to RPL {rpl} from CPL {cpl}")
    desc = space.descriptor(selector, GP, error)
    if not desc.is_code or (desc.conforming and desc.dpl > rpl) or (not desc.conforming and desc.dpl != rpl):
        raise GuestFault(GP, error, f"return selector {selector:#x} does not fit RPL {rpl}")
    if not desc.present:
        raise GuestFault(NP, error, f"code segment {selector:#x} not present")
    return desc


def _outer_stack(space: AddressSpace, ss: int, rpl: int) -> None:
    error = ss & 0xFFFC
    if error == 0 and not ss & 4:
        raise GuestFault(GP, 0, "return to a null stack selector")
    desc = space.descriptor(ss, GP, error)
    if ss & 3 != rpl or desc.dpl != rpl or not desc.writable_data:
        raise GuestFault(GP, error, f"return stack {ss:#x} does not fit RPL {rpl}")
    if not desc.present:
        raise GuestFault(SS, error, f"stack segment {ss:#x} not present")


def _null_data_segments(m: Machine, v: VCpu, space: AddressSpace, cpl: int) -> None:
    """After a return to an outer ring: data (and non-conforming code) segments it may not use are nulled."""
    for sreg in ("es", "fs", "gs", "ds"):
        selector = m.reg(sreg)
        if selector & 0xFFFC == 0:
            continue
        try:
            desc = space.descriptor(selector, GP, 0)
        except GuestFault:
            m.set_reg(sreg, 0)                  # no longer a valid selector
            continue
        if (not desc.is_code or not desc.conforming) and desc.dpl < cpl:
            m.set_reg(sreg, 0)


def ret_far(m: Machine, v: VCpu, r: Recipe) -> int:
    space = v.space(m)
    width = r.opsize
    release = r.operands[0].number & 0xFFFF if r.operands else 0
    eip, cs = peek(m, v, space, 2, width)
    cs &= 0xFFFF
    _return_target(space, cs, v.cpl)
    rpl = cs & 3
    esp = (m.reg("esp") + 2 * width + release) & 0xFFFFFFFF
    if rpl == v.cpl:
        return _enter(m, v, cs, eip, rpl, esp=esp)
    new_esp, new_ss = peek(m, v, space, 2, width, skip=2 * width + release)
    new_ss &= 0xFFFF
    _outer_stack(space, new_ss, rpl)
    _enter(m, v, cs, eip, rpl, esp=(new_esp + release) & 0xFFFFFFFF, ss=new_ss)
    _null_data_segments(m, v, space, rpl)
    return eip


# IRET (SDM Vol. 2A): what the popped EFLAGS may change, by the privilege of the code executing the iret.
_IRET_ALWAYS = _POPF_ALWAYS | RF


def iret(m: Machine, v: VCpu, r: Recipe) -> int:
    space = v.space(m)
    width = r.opsize
    real_flags = m.reg("eflags")
    if real_flags & NT:
        # A task return through the TSS back link: #TS when the link is not a busy TSS, as the bare
        # machine does; a real task switch is not modelled.
        link = struct.unpack("<H", space.read(v.tr.base, 2))[0] if v.tr.limit >= 1 else 0
        raise GuestFault(TS, link & 0xFFFC, f"iret with NT: back link {link:#x} (task switches are not modelled)")
    eip, cs, flags = peek(m, v, space, 3, width)
    cs &= 0xFFFF
    if width == 4 and flags & VM and v.cpl == 0:
        raise GuestFault(GP, 0, "iret to virtual-8086 mode is not modelled")
    _return_target(space, cs, v.cpl)
    rpl = cs & 3
    changeable = _IRET_ALWAYS | (IF if v.cpl <= v.iopl else 0) | (IOPL | VIF | VIP if v.cpl == 0 else 0)
    if width == 2:
        changeable &= 0xFFFF
    old = v.eflags(real_flags)
    new = (old & ~changeable) | (flags & changeable) | 2
    if rpl == v.cpl:
        return _enter(m, v, cs, eip, rpl, esp=(m.reg("esp") + 3 * width) & 0xFFFFFFFF,
                      eflags=v.set_eflags(new))
    new_esp, new_ss = peek(m, v, space, 2, width, skip=3 * width)
    new_ss &= 0xFFFF
    _outer_stack(space, new_ss, rpl)
    _enter(m, v, cs, eip, rpl, esp=new_esp, ss=new_ss, eflags=v.set_eflags(new))
    _null_data_segments(m, v, space, rpl)
    return eip


def int_(m: Machine, v: VCpu, r: Recipe) -> int:
    """int n, int3, into: delivery through the virtual IDT with the software-interrupt checks."""
    if r.name == "into":
        if not m.reg("eflags") & (1 << 11):
            return r.next
        vector = OF
    else:
        vector = BP if r.name == "int3" else r.operands[0].number & 0xFF
    deliver(m, v, Interrupt(vector, SOFTWARE, None, eip=r.next, insn=r.address, why=r.text))
    return m.reg("eip")


Routine = Callable[["Machine", VCpu, Recipe], int]

# The table: canonical name -> routine. Privileged and I/O first, then the sensitive-unprivileged ones.
TABLE: dict[str, Routine] = {
    "lgdt": lgdt, "lidt": lidt, "lldt": lldt, "ltr": ltr, "lmsw": lmsw, "clts": clts, "mov_cr": mov_cr,
    "mov_dr": mov_dr, "invlpg": invlpg, "hlt": hlt, "cli": cli, "sti": sti, "in": in_, "out": out,
    "ins": ins, "outs": outs, "rdmsr": rdmsr, "wrmsr": wrmsr, "wbinvd": _cache, "invd": _cache,
    "rdtsc": rdtsc,
    "sgdt": sgdt, "sidt": sidt, "sldt": sldt, "smsw": smsw, "str": str_, "pushf": pushf, "popf": popf,
    "push_seg": push_seg, "pop_seg": pop_seg, "mov_from_seg": mov_from_seg, "mov_to_seg": mov_to_seg,
    "lar": lar, "lsl": lsl, "verr": verr, "verw": verw, "call_far": call_far, "jmp_far": jmp_far,
    "ret_far": ret_far, "int": int_, "int3": int_, "into": int_, "iret": iret,
}
PRIVILEGED = frozenset({"lgdt", "lidt", "lldt", "ltr", "lmsw", "clts", "mov_cr", "mov_dr", "invlpg", "hlt",
                        "cli", "sti", "in", "out", "ins", "outs", "rdmsr", "wrmsr", "wbinvd", "invd", "rdtsc"})
SENSITIVE = frozenset(TABLE) - PRIVILEGED
