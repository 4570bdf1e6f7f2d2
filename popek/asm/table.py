"""Verified byte encodings for system instructions (32-bit code).

Keystone 0.9.2 gets several of these wrong (REFERENCES.md): a spurious 0x66 on sgdt/sidt/lgdt/lidt,
push/pop of cs/ss/ds/es and mov to/from a segment register; 16-bit far jumps and calls; bare
pushf/popf/iret assembled as the 16-bit forms; `jmp far`, `fword ptr`, `lar eax, bx` rejected. These
are the instructions a virtualization guest is made of, so popek encodes them itself from this table,
written in the SDM's opcode notation, and tests/test_asm.py checks every row against GNU as.

Operand patterns (Intel order):
  r16 r32        general register in the ModRM reg field
  reg16 reg32    general register in the ModRM r/m field
  rm16           reg16 or a memory operand (no size or ``word``)
  m  m16         memory (any size / no size or ``word``)
  m16:32         ``far [mem]`` or ``fword ptr [mem]``
  ptr16:32       ``far SEL:OFF`` (or ``SEL:OFF``)
  sreg           segment register in the reg field
  imm8 imm16     unsigned immediate
  al ax eax dx cs ds ...   that register
Encoding tokens: hex bytes; ``/0``-``/7`` ModRM with that reg field; ``/r`` ModRM with the reg-field
operand; ``ib`` ``iw`` the immediate; ``p32`` a far pointer (offset32 then selector16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from popek.asm.operands import Far, FarMem, Imm, Mem, Resolved
from popek.asm.registers import Reg


@dataclass(frozen=True, slots=True)
class Row:
    mnemonic: str
    operands: tuple[str, ...]
    encoding: str
    capstone: str     # the mnemonic Capstone prints for the bytes (checked after encoding)

    @property
    def digit(self) -> int | None:
        """The ModRM reg field a ``/digit`` row fixes (the verifier checks it: FF /3 vs FF /2)."""
        return next((int(t[1]) for t in self.encoding.split() if len(t) == 2 and t[0] == "/" and t[1].isdigit()),
                    None)


def _rows(spec: str) -> list[Row]:
    rows = []
    for line in spec.strip().splitlines():
        fields = [f.strip() for f in line.split("|")]
        mnemonic, operands, encoding = fields[:3]
        capstone = fields[3] if len(fields) > 3 and fields[3] else mnemonic
        rows.append(Row(mnemonic, tuple(o.strip() for o in operands.split(",") if o.strip()), encoding, capstone))
    return rows


# mnemonic | operands | encoding | Capstone's mnemonic when it differs
ROWS = _rows("""
lgdt   | m             | 0f 01 /2
lidt   | m             | 0f 01 /3
sgdt   | m             | 0f 01 /0
sidt   | m             | 0f 01 /1
sldt   | m16           | 0f 00 /0
sldt   | reg16         | 66 0f 00 /0
sldt   | reg32         | 0f 00 /0
str    | m16           | 0f 00 /1
str    | reg16         | 66 0f 00 /1
str    | reg32         | 0f 00 /1
smsw   | m16           | 0f 01 /4
smsw   | reg16         | 66 0f 01 /4
smsw   | reg32         | 0f 01 /4
lmsw   | rm16          | 0f 01 /6
lldt   | rm16          | 0f 00 /2
ltr    | rm16          | 0f 00 /3
verr   | rm16          | 0f 00 /4
verw   | rm16          | 0f 00 /5
lar    | r32, rm16     | 0f 02 /r
lar    | r32, reg32    | 0f 02 /r
lsl    | r32, rm16     | 0f 03 /r
lsl    | r32, reg32    | 0f 03 /r
invlpg | m             | 0f 01 /7
push   | es            | 06
push   | cs            | 0e
push   | ss            | 16
push   | ds            | 1e
push   | fs            | 0f a0
push   | gs            | 0f a8
pop    | es            | 07
pop    | ss            | 17
pop    | ds            | 1f
pop    | fs            | 0f a1
pop    | gs            | 0f a9
mov    | sreg, rm16    | 8e /r
mov    | sreg, reg32   | 8e /r
mov    | m16, sreg     | 8c /r
mov    | reg32, sreg   | 8c /r
mov    | reg16, sreg   | 66 8c /r
pushf  |               | 9c        | pushfd
pushfd |               | 9c
pushfw |               | 66 9c     | pushf
popf   |               | 9d        | popfd
popfd  |               | 9d
popfw  |               | 66 9d     | popf
iret   |               | cf        | iretd
iretd  |               | cf
iretw  |               | 66 cf     | iret
retf   |               | cb
retf   | imm16         | ca iw
jmp    | ptr16:32      | ea p32    | ljmp
call   | ptr16:32      | 9a p32    | lcall
ljmp   | ptr16:32      | ea p32
lcall  | ptr16:32      | 9a p32
jmp    | m16:32        | ff /5
call   | m16:32        | ff /3
ljmp   | m             | ff /5     | jmp
lcall  | m             | ff /3     | call
int    | imm8          | cd ib
int3   |               | cc
into   |               | ce
hlt    |               | f4
cli    |               | fa
sti    |               | fb
clts   |               | 0f 06
invd   |               | 0f 08
wbinvd |               | 0f 09
wrmsr  |               | 0f 30
rdtsc  |               | 0f 31
rdmsr  |               | 0f 32
rdpmc  |               | 0f 33
cpuid  |               | 0f a2
in     | al, dx        | ec
in     | ax, dx        | 66 ed
in     | eax, dx       | ed
in     | al, imm8      | e4 ib
in     | ax, imm8      | 66 e5 ib
in     | eax, imm8     | e5 ib
out    | dx, al        | ee
out    | dx, ax        | 66 ef
out    | dx, eax       | ef
out    | imm8, al      | e6 ib
out    | imm8, ax      | 66 e7 ib
out    | imm8, eax     | e7 ib
insb   |               | 6c
insw   |               | 66 6d
insd   |               | 6d
outsb  |               | 6e
outsw  |               | 66 6f
outsd  |               | 6f
movsd  |               | a5
cmpsd  |               | a7
""")

_BY_MNEMONIC: dict[str, list[Row]] = {}
for _row in ROWS:
    _BY_MNEMONIC.setdefault(_row.mnemonic, []).append(_row)

_REG_ROLE = {"r16", "r32", "sreg"}
_RM_ROLE = {"reg16", "reg32", "rm16", "m", "m16", "m16:32"}


def _gpr(op: Resolved, size: int) -> bool:
    return isinstance(op, Reg) and op.kind == "gpr" and op.size == size


def matches(pattern: str, op: Resolved) -> bool:
    if pattern in ("r16", "reg16"):
        return _gpr(op, 16)
    if pattern in ("r32", "reg32"):
        return _gpr(op, 32)
    if pattern == "rm16":
        return _gpr(op, 16) or (isinstance(op, Mem) and op.size in (None, "word"))
    if pattern == "m":
        return isinstance(op, Mem)
    if pattern == "m16":
        return isinstance(op, Mem) and op.size in (None, "word")
    if pattern == "m16:32":
        return isinstance(op, FarMem) or (isinstance(op, Mem) and op.size == "fword")
    if pattern == "ptr16:32":
        return isinstance(op, Far)
    if pattern == "sreg":
        return isinstance(op, Reg) and op.kind == "sreg"
    if pattern in ("imm8", "imm16"):
        return isinstance(op, Imm)
    return isinstance(op, Reg) and op.name == pattern


def lookup(mnemonic: str, operands: tuple[Resolved, ...]) -> Row | None:
    for row in _BY_MNEMONIC.get(mnemonic, ()):
        if len(row.operands) == len(operands) and all(map(matches, row.operands, operands)):
            return row
    return None


class TableError(Exception):
    pass


def _unsigned(value: int, bits: int, what: str) -> bytes:
    if not 0 <= value < (1 << bits):
        raise TableError(f"{what} {value:#x} does not fit in {bits} bits")
    return value.to_bytes(bits // 8, "little")


def encode(row: Row, operands: tuple[Resolved, ...], memory: Callable[[Mem], tuple[bytes, int, bytes]]) -> bytes:
    """The bytes for ``row``. ``memory(mem)`` gives (prefixes, ModRM with reg field 0, SIB+displacement)
    for a memory operand; popek takes it from Keystone's encoding of ``lea`` (see encode.py)."""
    by_pattern = dict(zip(row.operands, operands))
    reg_op = next((op for p, op in by_pattern.items() if p in _REG_ROLE), None)
    rm_op = next((op for p, op in by_pattern.items() if p in _RM_ROLE), None)
    imm = next((op.value for op in operands if isinstance(op, Imm)), None)
    prefix, out = b"", bytearray()
    for token in row.encoding.split():
        if token[0] == "/":
            field = reg_op.num if token == "/r" else int(token[1])
            target = rm_op.mem if isinstance(rm_op, FarMem) else rm_op
            if isinstance(target, Mem):
                prefix, modrm, tail = memory(target)
                out += bytes([modrm | field << 3]) + tail
            else:
                out.append(0xC0 | field << 3 | target.num)
        elif token == "ib":
            out += _unsigned(imm, 8, "immediate")
        elif token == "iw":
            out += _unsigned(imm, 16, "immediate")
        elif token == "p32":
            far = next(op for op in operands if isinstance(op, Far))
            out += _unsigned(far.offset, 32, "far offset") + _unsigned(far.selector, 16, "selector")
        else:
            out.append(int(token, 16))
    return prefix + bytes(out)
