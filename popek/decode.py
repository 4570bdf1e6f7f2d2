"""The one Capstone front end. The scanner and the translator both decode through here.

Two speeds, because detail costs (REFERENCES: disasm_lite 1.6 M insn/s, with detail 0.19 M/s):
- ``sweep`` yields Capstone's lite tuples ``(address, size, mnemonic, op_str)`` for a whole region; the
  scanner filters those by mnemonic and only looks closer at the few that can matter.
- ``decode_at`` / ``Insn`` give one instruction with its bytes; ``detail_at`` gives Capstone's full object
  (operands, registers) for the translator, which decodes each instruction once at translation time.

Undecodable bytes are skipped one at a time (Capstone's skipdata) and reported as ``.byte``, as objdump
reports ``(bad)``.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import capstone
from capstone import x86_const

MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
BAD = ".byte"  # mnemonic of a byte Capstone could not decode

# Legacy prefixes (group 1-4). REX (0x40-0x4F) is a prefix only in 64-bit mode.
LEGACY_PREFIXES = frozenset(b"\x66\x67\xf0\xf2\xf3\x2e\x36\x3e\x26\x64\x65")


@dataclass(frozen=True, slots=True)
class Insn:
    """One decoded instruction: what the scanner reports and the translator consumes."""

    address: int
    size: int
    mnemonic: str
    op_str: str
    raw: bytes
    mode: int

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()

    @property
    def opcode(self) -> tuple[bytes, int | None]:
        return opcode_and_modrm(self.raw, 0, self.mode)


@lru_cache(maxsize=None)
def _cs(mode: int, detail: bool) -> capstone.Cs:
    if mode not in MODES:
        raise ValueError(f"mode must be 16, 32 or 64, not {mode!r}")
    md = capstone.Cs(capstone.CS_ARCH_X86, MODES[mode])
    md.skipdata = True
    md.detail = detail
    return md


CHUNK = 8192  # instructions per Capstone call: bounds memory (Capstone allocates all results of one call)


# Encodings Capstone 5 misdecodes, by opcode after the prefixes: each is the opcode, a ModRM with its SIB and
# displacement, and no immediate (SDM Vol. 2: the hint NOPs 0F 18-1F "NOP r/m", 0F 0D "NOP/PREFETCH r/m",
# group 15 0F AE, UD1 0F B9 "UD1 r, r/m"). Capstone emits a lone ``.byte`` for some ModRMs of them (0F 1E C0,
# 0F 1C /r, 0F 0D /7, 0F AE EA) or decodes UD1 without its ModRM, and the sweep then decodes the operand bytes
# as instructions (a false ``ljmp`` after UD1). Each entry is checked against objdump in the tests.
CAPSTONE_GAPS = {bytes([0x0F, b]): name for b, name in [
    (0x18, "nop"), (0x19, "nop"), (0x1A, "nop"), (0x1B, "nop"), (0x1C, "nop"), (0x1D, "nop"), (0x1E, "nop"),
    (0x1F, "nop"), (0x0D, "nop"), (0xAE, "lfence"), (0xB9, "ud1")]}
# x87 register forms that Capstone 5 (and objdump) reject but every x87 FPU since the 8087 executes as
# aliases of documented operations, and Unicorn (QEMU's fxch4, fcom2, fcomp3, fcomp5, fxch7, fstp8, fstp9)
# executes too: by (opcode, ModRM & 0xF8), each two bytes long after its prefixes. The other register forms
# Capstone rejects in D8-DF are #UD on the CPU and in Unicorn, and stay undecodable here.
X87_ALIASES = {(0xDC, 0xD0): "fcom", (0xDC, 0xD8): "fcomp", (0xDD, 0xC8): "fxch", (0xDE, 0xD0): "fcomp",
               (0xDF, 0xC8): "fxch", (0xDF, 0xD0): "fstp", (0xDF, 0xD8): "fstp"}
_GAP_IDS = frozenset([0, x86_const.X86_INS_UD1])   # .byte, and UD1 (decoded without its ModRM)


def gap(code, offset: int, mode: int) -> tuple[int, str] | None:
    """``(length, mnemonic)`` of the instruction at ``code[offset]`` if it is one Capstone misdecodes or
    rejects (CAPSTONE_GAPS, X87_ALIASES), else None."""
    end = min(len(code), offset + 15)
    i, addr16 = offset, mode == 16
    while i < end and (code[i] in LEGACY_PREFIXES or (mode == 64 and 0x40 <= code[i] <= 0x4F)):
        if code[i] == 0x67 and mode != 64:
            addr16 = not addr16
        i += 1
    if i + 1 < end and (code[i], code[i + 1] & 0xF8) in X87_ALIASES:
        return i + 2 - offset, X87_ALIASES[code[i], code[i + 1] & 0xF8]
    if i + 2 >= end or bytes(code[i:i + 2]) not in CAPSTONE_GAPS:
        return None
    length = i + 3 - offset + modrm_tail(code[i + 2], code[i + 3] if i + 3 < end else 0, addr16)
    if offset + length > len(code) or length > 15:
        return None
    return length, CAPSTONE_GAPS[bytes(code[i:i + 2])]


def gap_length(code, offset: int, mode: int) -> int | None:
    """The length of the instruction at ``code[offset]`` if it is a gap (``gap``), else None."""
    found = gap(code, offset, mode)
    return found[0] if found else None


def modrm_tail(modrm: int, sib: int, addr16: bool) -> int:
    """Bytes after a ModRM byte: its SIB and displacement (SDM Vol. 2 tables 2-1 and 2-2)."""
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        return 0
    if addr16:
        return {0: 2 if rm == 6 else 0, 1: 1, 2: 2}[mod]
    tail = 1 if rm == 4 else 0
    if mod == 0:
        return tail + (4 if rm == 5 or (rm == 4 and sib & 7 == 5) else 0)
    return tail + (1 if mod == 1 else 4)


def sweep(code: bytes, base: int, mode: int, offset: int = 0, count: int = 0) -> Iterator[tuple[int, int, str, str]]:
    """Linear sweep: ``(address, size, mnemonic, op_str)`` for every instruction from ``code[offset:]``
    (at most ``count`` of them when count > 0). The CAPSTONE_GAPS are stepped over at their true length."""
    md = _cs(mode, False)
    view = memoryview(code)
    end = len(code)
    left = count or -1
    chunk = CHUNK
    while offset < end and left:
        step = chunk if left < 0 else min(chunk, left)
        last = None
        done = 0
        for last in md.disasm_lite(view[offset:], base + offset, step):
            done += 1
            if last[2] in (BAD, "ud1"):
                start = last[0] - base
                found = gap(code, start, mode)
                if found is not None and found[0] != last[1]:
                    last = (last[0], *found, "")
                    yield last
                    left -= 1 if left > 0 else 0
                    chunk = max(16, done * 2)   # as in sweep_records: decode less after a gap
                    break
            else:
                chunk = min(CHUNK, chunk * 2) if done == step else chunk
            yield last
            left -= 1 if left > 0 else 0
            if not left:
                return
        if last is None:
            return
        offset = last[0] + last[1] - base


# The scanner's hot loop reads Capstone's C records directly: one ctypes call decodes CHUNK instructions and
# the instruction ids come out as one memoryview slice, so Python touches only the few candidates.
RECORD = ctypes.sizeof(capstone._cs_insn)
_ID_STRIDE = RECORD // 4
_ADDRESS_SIZE = struct.Struct("<QH")
_MNEMONIC_AT = capstone._cs_insn.mnemonic.offset
_OP_STR_AT = capstone._cs_insn.op_str.offset
_ADDRESS_AT = capstone._cs_insn.address.offset
BYTES_AT = capstone._cs_insn.bytes.offset


class Records:
    """A batch of raw Capstone records; ``ids`` lists their instruction ids in order."""

    __slots__ = ("blob", "ids")

    def __init__(self, blob: bytes):
        self.blob = blob
        self.ids = memoryview(blob).cast("I")[::_ID_STRIDE].tolist()

    def address_size(self, i: int) -> tuple[int, int]:
        return _ADDRESS_SIZE.unpack_from(self.blob, i * RECORD + _ADDRESS_AT)

    def text(self, i: int) -> tuple[str, str]:
        blob, at = self.blob, i * RECORD
        m, o = at + _MNEMONIC_AT, at + _OP_STR_AT
        return blob[m:blob.index(0, m)].decode(), blob[o:blob.index(0, o)].decode()


def sweep_records(code: bytes, base: int, mode: int) -> Iterator[Records]:
    """Linear sweep of the whole of ``code`` in batches of raw records (skipdata on, as in ``sweep``)."""
    md = _cs(mode, False)
    cbuf = (ctypes.c_char * max(1, len(code))).from_buffer_copy(code or b"\0")
    start = ctypes.addressof(cbuf)
    out = ctypes.POINTER(capstone._cs_insn)()
    offset = 0
    chunk = CHUNK
    while offset < len(code):
        n = capstone._cs.cs_disasm(md.csh, ctypes.cast(start + offset, ctypes.POINTER(ctypes.c_char)),
                                   len(code) - offset, base + offset, chunk, ctypes.byref(out))
        if n == 0:
            return
        try:
            blob = ctypes.string_at(out, n * RECORD)
        finally:
            capstone._cs.cs_free(out, n)
        batch = Records(blob)
        # A misdecoded gap (CAPSTONE_GAPS) ends the batch at its true length; decoding resumes after it.
        for i in [i for i, ident in enumerate(batch.ids) if ident in _GAP_IDS]:
            address, size = batch.address_size(i)
            found = gap(code, address - base, mode)
            if found is not None and found[0] != size:
                batch = Records(blob[:i * RECORD] + _gap_record(blob[i * RECORD:(i + 1) * RECORD], *found))
                break
        # Gaps come in runs (a table of them, or code full of endbr-like hints): decode less after one, so
        # the instructions decoded past it and thrown away stay few.
        chunk = max(16, len(batch.ids) * 2) if len(batch.ids) < n else min(CHUNK, chunk * 2)
        yield batch
        address, size = batch.address_size(len(batch.ids) - 1)
        offset = address + size - base


_GAP_ID = {"nop": x86_const.X86_INS_NOP, "lfence": x86_const.X86_INS_LFENCE, "ud1": x86_const.X86_INS_UD1,
           "fxch": x86_const.X86_INS_FXCH, "fcom": x86_const.X86_INS_FCOM, "fcomp": x86_const.X86_INS_FCOMP,
           "fstp": x86_const.X86_INS_FSTP}


def _gap_record(record: bytes, size: int, mnemonic: str) -> bytes:
    """Capstone's record of a misdecoded gap, corrected: its id, size and mnemonic, no operand text."""
    rec = bytearray(record)
    struct.pack_into("<I", rec, 0, _GAP_ID[mnemonic])
    struct.pack_into("<H", rec, _ADDRESS_AT + 8, size)
    rec[_MNEMONIC_AT:_MNEMONIC_AT + len(mnemonic) + 1] = mnemonic.encode() + b"\0"
    rec[_OP_STR_AT] = 0
    return bytes(rec)


@lru_cache(maxsize=None)
def mnemonic_ids() -> dict[str, frozenset[int]]:
    """Capstone's x86 instruction ids by mnemonic (the printed mnemonic of each id)."""
    md = _cs(32, False)
    table: dict[str, set[int]] = {}
    for ident in range(1, x86_const.X86_INS_ENDING):
        name = md.insn_name(ident)
        if name:
            table.setdefault(name, set()).add(ident)
    return {k: frozenset(v) for k, v in table.items()}


def ids_for(mnemonic: str) -> frozenset[int]:
    """The ids Capstone may print as ``mnemonic`` (a ``rep`` prefix is printed but not part of the id)."""
    bare = mnemonic.split()[-1]
    return mnemonic_ids().get(bare, frozenset())


def decode_at(code: bytes, offset: int, base: int, mode: int) -> Insn | None:
    """The instruction at ``code[offset]`` (address ``base + offset``), or None if it does not decode."""
    for address, size, mnemonic, op_str in _cs(mode, False).disasm_lite(code[offset:offset + 15], base + offset, 1):
        if mnemonic in (BAD, "ud1"):                # a Capstone gap: its true length, as the sweep has it
            found = gap(code, offset, mode)
            if found is not None and (mnemonic == BAD or found[0] != size):
                length, name = found
                return Insn(address, length, name, "", bytes(code[offset:offset + length]), mode)
            if mnemonic == BAD:
                return None
        return Insn(address, size, mnemonic, op_str, bytes(code[offset:offset + size]), mode)
    return None


def insn_from_lite(code: bytes, base: int, mode: int, lite: tuple[int, int, str, str]) -> Insn:
    address, size, mnemonic, op_str = lite
    start = address - base
    return Insn(address, size, mnemonic, op_str, bytes(code[start:start + size]), mode)


def detail_at(code: bytes, offset: int, address: int, mode: int):
    """Capstone's full instruction object (with operands) for the translator, or None."""
    for insn in _cs(mode, True).disasm(code[offset:offset + 15], address, 1):
        return None if insn.mnemonic == BAD else insn
    return None


def opcode_and_modrm(code: bytes, offset: int, mode: int) -> tuple[bytes, int | None]:
    """The opcode bytes (one, ``0F xx`` or ``0F 38/3A xx``) and the ModRM byte of the instruction at offset.

    Used to tell apart encodings that share a Capstone mnemonic (FF /2 near call vs FF /3 far call). The
    ModRM is returned for every opcode byte that has one in the forms popek matches; others get None.
    """
    end = min(len(code), offset + 15)
    i = offset
    while i < end and (code[i] in LEGACY_PREFIXES or (mode == 64 and 0x40 <= code[i] <= 0x4F)):
        i += 1
    if i >= end:
        return b"", None
    if code[i] == 0x0F and i + 1 < end:
        if code[i + 1] in (0x38, 0x3A) and i + 2 < end:
            op, i = bytes(code[i:i + 3]), i + 3
        else:
            op, i = bytes(code[i:i + 2]), i + 2
    else:
        op, i = bytes(code[i:i + 1]), i + 1
    modrm = code[i] if i < end and op in _HAS_MODRM else None
    return op, modrm


# Opcodes whose ModRM reg field selects the instruction (group opcodes) or names a special register.
_HAS_MODRM = frozenset(
    [bytes([b]) for b in (0x8C, 0x8E, 0xFF, 0xFE, 0xF6, 0xF7, 0x80, 0x81, 0x83, 0x8F, 0xC6, 0xC7, 0xD0,
                          0xD1, 0xD2, 0xD3, 0xC0, 0xC1, 0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF)]
    + [bytes([0x0F, b]) for b in (0x00, 0x01, 0x02, 0x03, 0x20, 0x21, 0x22, 0x23, 0xBA, 0xC7, 0xAE)]
)


# --- near control transfers, by opcode ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NearTransfer:
    """A near jmp, call, jcc, ret, loop or jecxz, read from its bytes (never from the printed mnemonic, which
    carries prefix words: ``bnd ret``, ``notrack jmp``). ``opsize``: the operand size, which is the width of
    EIP after the transfer and of a pushed or popped return address (16 with a 66 prefix); ``addrsize``: the
    address size, which is the counter of loop/jecxz (CX with a 67 prefix) and the memory operand's
    addressing; ``rel``: the signed displacement from the next instruction (None for ret and r/m forms);
    ``cond``: a jcc's condition (0-15); ``release``: ``ret imm16``'s immediate."""

    kind: str           # one of TRANSFER_KINDS
    opsize: int
    addrsize: int
    rel: int | None = None
    cond: int | None = None
    release: int = 0
    opcode_at: int = 0  # offset of the opcode byte (after the prefixes)

    def target(self, next_ip: int) -> int:
        """Where a taken relative transfer goes: EIP truncated to the operand size, as the CPU does."""
        return (next_ip + self.rel) & (0xFFFF if self.opsize == 16 else 0xFFFFFFFF)

    @property
    def sized16(self) -> bool:
        """A form that differs from its 32-bit meaning: a 16-bit EIP, or a 16-bit loop/jecxz counter."""
        return self.opsize == 16 or (self.addrsize == 16 and self.kind in COUNTER_KINDS)


TRANSFER_KINDS = ("jmp", "call", "jcc", "ret", "jmp_rm", "call_rm", "loop", "loope", "loopne", "jecxz")
COUNTER_KINDS = frozenset({"loop", "loope", "loopne", "jecxz"})
# opcode -> (kind, displacement bytes: 1, or "v" for 2 or 4 by operand size; 0 for none, 2 for ret imm16)
_NEAR = {b"\xe8": ("call", "v"), b"\xe9": ("jmp", "v"), b"\xeb": ("jmp", 1), b"\xc3": ("ret", 0),
         b"\xc2": ("ret", 2), b"\xe0": ("loopne", 1), b"\xe1": ("loope", 1), b"\xe2": ("loop", 1),
         b"\xe3": ("jecxz", 1)}
_NEAR.update({bytes([0x70 + c]): ("jcc", 1) for c in range(16)})
_NEAR.update({bytes([0x0F, 0x80 + c]): ("jcc", "v") for c in range(16)})
_NEAR_RM = {2: "call_rm", 4: "jmp_rm"}           # FF /2, FF /4


def near_transfer(raw: bytes, mode: int = 32) -> NearTransfer | None:
    """The near control transfer ``raw`` encodes (one whole instruction, prefixes included), or None."""
    op, modrm = opcode_and_modrm(raw, 0, mode)
    at = 0
    while at < len(raw) and raw[at] in LEGACY_PREFIXES:
        at += 1
    prefixes = raw[:at]
    opsize = (16 if mode == 32 else 32) if 0x66 in prefixes else (32 if mode == 32 else 16)
    addrsize = (16 if mode == 32 else 32) if 0x67 in prefixes else (32 if mode == 32 else 16)
    if op == b"\xff":
        kind = _NEAR_RM.get((modrm >> 3) & 7) if modrm is not None else None
        return NearTransfer(kind, opsize, addrsize, opcode_at=at) if kind else None
    entry = _NEAR.get(op)
    if entry is None:
        return None
    kind, width = entry
    width = (opsize // 8) if width == "v" else width
    tail = raw[at + len(op):at + len(op) + width]
    if len(tail) != width:
        return None
    value = int.from_bytes(tail, "little", signed=kind != "ret") if width else 0
    if kind == "ret":
        return NearTransfer(kind, opsize, addrsize, release=value, opcode_at=at)
    cond = op[-1] & 0xF if kind == "jcc" else None
    return NearTransfer(kind, opsize, addrsize, rel=value, cond=cond, opcode_at=at)
