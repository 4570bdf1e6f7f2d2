"""The x86 code ``bt`` writes into its translation cache: a few fixed encodings, and the inline lookup block.

Everything here is bytes at a known cache address (relative branches need it). Every encoding is checked
against Capstone by tests/test_bt.py. What the generated code may use, and why:

- **Guest instructions** are copied unchanged (IDENT) or become a *callout* (see popek.monitors.bt): a
  2-byte ``syscall``, which Unicorn hands to an instruction hook before it ends the translated block and
  continues at whatever EIP the hook left (+2): a callout can emulate anything, change flags, segments or
  control flow, for about 0.25 µs plus its work. Unicorn's ``syscall`` does nothing else. One flaw
  (Unicorn 2.1.4, measured): with an instruction hook installed, a ``syscall`` (or ``cpuid``) that follows
  an add, sub, cmp, neg or shift *in the same translated block* leaves wrong OF/CF/AF behind, before the
  hook even runs. So a callout always starts a block: it sits at the start of a glue block, reached by a
  counted ``jmp`` that stands for the guest instruction. The one callout that must stay in the unit (after
  a ``rep`` string instruction, see bt_translate) is ``int`` instead, whose exception path keeps the flags.
- **Glue** (call, return and indirect-branch sequences, exit stubs) lives in a region the machine's
  instruction counter does not count (``Engine.count_only``): a guest instruction is one counted cache
  instruction, so timer interrupts land where they land natively. Glue must not change the guest's flags
  (only ``lea``, ``jecxz``, ``xchg``, ``push``/``pop``, ``mov``, ``jmp``) and must never leave a cache
  address in a register or in memory: it compares guest addresses and jumps to cache addresses.
- The guest's stack is glue's only scratch memory (the monitor has none the guest could not also read):
  an indirect branch pushes its target there, a return exchanges ECX with the return-address slot. The only
  values written are guest values; a return puts the return address back in its slot afterwards.
"""
from __future__ import annotations

import struct

SYSCALL = b"\x0f\x05"
CONTINUE_VECTOR = 0xE7
INT_CONTINUE = bytes((0xCD, CONTINUE_VECTOR))
INT3 = b"\xcc"
HLT = b"\xf4"
XCHG_ECX_TOP = b"\x87\x0c\x24"          # xchg ecx, [esp]
POP_ECX = b"\x59"
DEC_ECX = b"\x8d\x49\xff"               # lea ecx, [ecx - 1]  (loop without touching flags)
STUB_SIZE = 5                           # an exit stub: syscall + padding, or (filled) jmp rel32


def rel32(next_ip: int, target: int) -> bytes:
    return struct.pack("<I", (target - next_ip) & 0xFFFFFFFF)


def jmp(at: int, target: int) -> bytes:
    return b"\xe9" + rel32(at + 5, target)


def jcc(at: int, cc: int, target: int) -> bytes:
    """Jcc rel32; ``cc`` is the condition nibble (the low 4 bits of 7x / 0F 8x)."""
    return bytes((0x0F, 0x80 | cc)) + rel32(at + 6, target)


def push_imm(value: int) -> bytes:
    return b"\x68" + struct.pack("<I", value & 0xFFFFFFFF)


def lea_ecx(disp: int) -> bytes:
    """lea ecx, [ecx + disp32]: adds without touching flags."""
    return b"\x8d\x89" + struct.pack("<I", disp & 0xFFFFFFFF)


def lea_esp(disp: int) -> bytes:
    """lea esp, [esp + disp32]."""
    return b"\x8d\xa4\x24" + struct.pack("<I", disp & 0xFFFFFFFF)


def jecxz(at: int, target: int) -> bytes:
    disp = target - (at + 2)
    assert -128 <= disp <= 127, disp
    return bytes((0xE3, disp & 0xFF))


def stub() -> bytes:
    """An unresolved exit: a callout, padded so that it can become ``jmp rel32``."""
    return SYSCALL + INT3 * (STUB_SIZE - len(SYSCALL))


def push_rm(raw: bytes, opcode_at: int) -> bytes:
    """``push r/m32`` with the operand of an ``FF /2`` or ``FF /4`` (near call/jmp through r/m32): the same
    prefixes, ModRM (reg field set to 6), SIB and displacement. The operand is evaluated exactly as the
    branch evaluates it, before ESP moves."""
    modrm = raw[opcode_at + 1]
    return raw[:opcode_at] + bytes((0xFF, (modrm & 0xC7) | (6 << 3))) + raw[opcode_at + 2:]


# --- the inline lookup ("polymorphic inline cache") of one indirect branch or return --------------------
ENTRY = 14          # lea ecx,[ecx-E] (6); jecxz hit (2); lea ecx,[ecx+E] (6)


class Lookup:
    """The layout of one lookup block (ret, jmp r/m, call r/m), ``ways`` guest targets compared in turn:

        [push r/m32]                  jmp/call through r/m: the target on the stack
        xchg ecx, [esp]               ECX = target, the slot = the guest's ECX
        way i:  lea ecx, [ecx - E_i]; jecxz hit_i; lea ecx, [ecx + E_i]     (empty: jmp miss)
        miss:   xchg ecx, [esp]       the state the guest branch started from, target on the stack
                syscall               the monitor pops it, finds or translates, fills a way
        hit_i:  pop ecx               the guest's ECX back, ESP past the slot
                [mov dword [esp-4], E_i]        ret: the slot holds the return address again
                [lea esp, [esp+n]]              ret n
                [push R]                        call: the guest return address
                jmp E'_i                        the translation of E_i
    """

    def __init__(self, kind: str, ways: int, prologue: bytes = b"", release: int = 0, ret_to: int = 0):
        assert kind in ("ret", "jmp", "call")
        self.kind, self.ways, self.prologue, self.release, self.ret_to = kind, ways, prologue, release, ret_to
        self.entries_at = len(prologue) + len(XCHG_ECX_TOP)
        self.miss_at = self.entries_at + ways * ENTRY
        self.callout_at = self.miss_at + len(XCHG_ECX_TOP)
        hit = len(POP_ECX) + 5
        if kind == "ret":
            hit += 8 + (7 if release else 0)
        elif kind == "call":
            hit += 5
        self.hit_size = hit
        self.hits_at = self.callout_at + len(SYSCALL)
        self.size = self.hits_at + ways * hit

    def code(self, at: int, filled: list[tuple[int, int]]) -> bytes:
        """The whole block at cache address ``at`` with ``filled`` = [(guest target, cache target)...]."""
        assert len(filled) <= self.ways
        out = bytearray(self.prologue + XCHG_ECX_TOP)
        miss = at + self.miss_at
        for i in range(self.ways):
            start = at + len(out)
            if i < len(filled):
                guest = filled[i][0]
                out += lea_ecx(-guest) + jecxz(start + 6, at + self.hits_at + i * self.hit_size) + lea_ecx(guest)
            else:
                out += jmp(start, miss) + INT3 * (ENTRY - 5)
        out += XCHG_ECX_TOP + SYSCALL
        for i in range(self.ways):
            start = at + len(out)
            if i < len(filled):
                guest, cache = filled[i]
                hit = bytearray(POP_ECX)
                if self.kind == "ret":
                    hit += b"\xc7\x44\x24\xfc" + struct.pack("<I", guest)
                    if self.release:
                        hit += lea_esp(self.release)
                elif self.kind == "call":
                    hit += push_imm(self.ret_to)
                hit += jmp(start + len(hit), cache)
                out += hit
            else:
                out += INT3 * self.hit_size
        assert len(out) == self.size, (len(out), self.size)
        return bytes(out)
