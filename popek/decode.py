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

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import capstone

MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
BAD = ".byte"  # mnemonic of a byte Capstone could not decode

# Legacy prefixes (group 1-4). REX (0x40-0x4F) is a prefix only in 64-bit mode.
_LEGACY_PREFIXES = frozenset(b"\x66\x67\xf0\xf2\xf3\x2e\x36\x3e\x26\x64\x65")


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


def sweep(code: bytes, base: int, mode: int, offset: int = 0, count: int = 0) -> Iterator[tuple[int, int, str, str]]:
    """Linear sweep: ``(address, size, mnemonic, op_str)`` for every instruction from ``code[offset:]``."""
    md = _cs(mode, False)
    view = memoryview(code)[offset:] if offset else code
    return md.disasm_lite(view, base + offset, count)


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
    while i < end and (code[i] in _LEGACY_PREFIXES or (mode == 64 and 0x40 <= code[i] <= 0x4F)):
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
