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


def sweep(code: bytes, base: int, mode: int, offset: int = 0, count: int = 0) -> Iterator[tuple[int, int, str, str]]:
    """Linear sweep: ``(address, size, mnemonic, op_str)`` for every instruction from ``code[offset:]``
    (at most ``count`` of them when count > 0)."""
    md = _cs(mode, False)
    view = memoryview(code)
    end = len(code)
    left = count or -1
    while offset < end and left:
        step = CHUNK if left < 0 else min(CHUNK, left)
        last = None
        for last in md.disasm_lite(view[offset:], base + offset, step):
            yield last
        if last is None:
            return
        left -= step if left > 0 else 0
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
    while offset < len(code):
        n = capstone._cs.cs_disasm(md.csh, ctypes.cast(start + offset, ctypes.POINTER(ctypes.c_char)),
                                   len(code) - offset, base + offset, CHUNK, ctypes.byref(out))
        if n == 0:
            return
        try:
            batch = Records(ctypes.string_at(out, n * RECORD))
        finally:
            capstone._cs.cs_free(out, n)
        yield batch
        address, size = batch.address_size(n - 1)
        offset = address + size - base


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
                          0xD1, 0xD2, 0xD3, 0xC0, 0xC1)]
    + [bytes([0x0F, b]) for b in (0x00, 0x01, 0x02, 0x03, 0x20, 0x21, 0x22, 0x23, 0xBA, 0xC7, 0xAE)]
)
