"""One instruction → bytes, never silently wrong.

Order of preference:
1. the verified table (table.py) for system instructions in 32-bit code — Keystone 0.9.2 misencodes
   several of them, and they are what guests for a virtualization tool are made of;
2. ``near`` branches, encoded here (Keystone has no syntax to force rel32);
3. Keystone, given text popek rendered itself (symbols already replaced by numbers).
Whatever the source, the bytes then go through verify.py (Capstone round trip); a mismatch is an error
naming the instruction, never a warning.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import keystone

from popek.asm import table
from popek.asm.expr import ExprError, Lookup
from popek.asm.operands import (Branch, Far, FarMem, Imm, Mem, OperandError, Resolved, keystone_text,
                                resolve)
from popek.asm.parse import Instruction
from popek.asm.registers import Reg
from popek.asm.verify import BRANCHES, CC_NUMBER, Expect, VerifyError, canonical, verify


class EncodeError(Exception):
    def __init__(self, message: str, column: int | None = None):
        super().__init__(message)
        self.message, self.column = message, column


@dataclass(frozen=True, slots=True)
class Encoded:
    data: bytes
    via: str   # "table", "keystone" or "popek" (near branches)
    row: table.Row | None = None


_PREFIX_BYTES = {"rep": 0xF3, "repe": 0xF3, "repz": 0xF3, "repne": 0xF2, "repnz": 0xF2, "lock": 0xF0}

# Mnemonics whose name alone asks for the other operand size (so 0x66 is expected).
EXPLICIT_16 = frozenset("pushfw popfw iretw cbw cwd movsw stosw lodsw scasw cmpsw insw outsw pushaw "
                        "popaw pushw popw".split())
EXPLICIT_32 = frozenset("pushfd popfd iretd cwde cdq movsd stosd lodsd scasd cmpsd insd outsd pushad "
                        "popad pushal popal pushd popd".split())

# Without a register operand these do not say how wide their memory operand is; Keystone would pick
# one silently, GNU as refuses, and so does popek.
SIZE_NEEDED = frozenset("mov add adc sub sbb and or xor cmp test inc dec neg not mul imul div idiv shl shr "
                        "sal sar rol ror rcl rcr bt bts btr btc".split())
_SHIFTS = frozenset("shl shr sal sar rol ror rcl rcr".split())

_MODES = {16: keystone.KS_MODE_16, 32: keystone.KS_MODE_32}


@lru_cache(maxsize=None)
def _ks(mode: int) -> keystone.Ks:
    return keystone.Ks(keystone.KS_ARCH_X86, _MODES[mode])


@lru_cache(maxsize=8192)
def keystone_bytes(text: str, address: int, mode: int) -> bytes:
    """Keystone's encoding of ``text`` at ``address`` (errors as EncodeError)."""
    try:
        encoding, _ = _ks(mode).asm(text, address)
    except keystone.KsError as exc:
        mnemonic = text.split()[0] if text.split() else text
        if exc.errno == keystone.KS_ERR_ASM_MNEMONICFAIL:
            raise EncodeError(f"unknown instruction '{mnemonic}'") from None
        if exc.errno == keystone.KS_ERR_ASM_INVALIDOPERAND:
            raise EncodeError(f"invalid operands for '{mnemonic}' (Keystone: {exc})") from None
        if exc.errno == keystone.KS_ERR_ASM_FIXUP_INVALID:
            raise EncodeError(f"branch target out of range for '{text}'") from None
        raise EncodeError(f"Keystone cannot assemble '{text}': {exc}") from None
    if not encoding:
        raise EncodeError(f"Keystone produced no bytes for '{text}'")
    return bytes(encoding)


def _memory(mode: int):
    """(prefixes, ModRM with reg=0, SIB+displacement) of a memory operand, from Keystone's ``lea``.

    ``lea eax, [m]`` (8D /r) exists for every addressing form and has no operand-size quirk, and its
    bytes are checked like any other encoding before their addressing part is reused.
    """
    def memory(mem: Mem) -> tuple[bytes, int, bytes]:
        bare = Mem(None, mem.segment, mem.regs, mem.disp)
        text = f"lea eax, {bare.text()}"
        data = keystone_bytes(text, 0, mode)
        verify(data, 0, _expect((), "lea", (_EAX, bare), mode))
        i = 0
        while data[i] in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x67):
            i += 1
        assert data[i] == 0x8D, data
        return data[:i], data[i + 1] & 0xC7, data[i + 2:]
    return memory


_EAX = Reg("eax", "gpr", 32, 0)


def _expect(prefixes: tuple[str, ...], mnemonic: str, ops: tuple[Resolved, ...], mode: int,
            capstone: str | None = None, modrm_reg: int | None = None) -> Expect:
    regs = [op for op in ops if isinstance(op, Reg)]
    mems = [op.mem if isinstance(op, FarMem) else op for op in ops if isinstance(op, (Mem, FarMem))]
    other = 16 if mode == 32 else 32
    opsize = (any(r.kind == "gpr" and r.size == other for r in regs)
              or any(m.size == ("word" if mode == 32 else "dword") for m in mems)
              or mnemonic in (EXPLICIT_16 if mode == 32 else EXPLICIT_32)
              or any(r.kind == "xmm" for r in regs))   # 0x66 is a mandatory SSE prefix
    addrsize = (any(m.addr16 == (mode == 32) and m.regs for m in mems)
                or mnemonic == ("jcxz" if mode == 32 else "jecxz"))
    target = imms = None
    if mnemonic in BRANCHES and len(ops) == 1 and isinstance(ops[0], (Imm, Branch)):
        target = ops[0].value if isinstance(ops[0], Imm) else ops[0].target
    else:
        imms = tuple(op.value for op in ops if isinstance(op, Imm))
        imms += tuple(v for op in ops if isinstance(op, Far) for v in (op.selector, op.offset))
    mem = (dict(mems[0].regs), mems[0].disp) if mems else None
    return Expect(canonical(" ".join(prefixes + (capstone or mnemonic,))), mode, opsize, addrsize,
                  mems[0].segment.name if mems and mems[0].segment else None, target, imms or (), mem,
                  modrm_reg)


def _near(mnemonic: str, target: int, address: int, mode: int) -> bytes:
    if mnemonic in ("jmp", "call"):
        opcode = b"\xe9" if mnemonic == "jmp" else b"\xe8"
    elif mnemonic[0] == "j" and mnemonic[1:] in CC_NUMBER:
        opcode = bytes([0x0F, 0x80 + CC_NUMBER[mnemonic[1:]]])
    else:
        raise EncodeError(f"'{mnemonic}' has no near form")
    width = mode // 8
    rel = target - (address + len(opcode) + width)
    return opcode + (rel & ((1 << mode) - 1)).to_bytes(width, "little")


def _is_short(data: bytes) -> bool:
    op = data[1] if data[0] == 0x67 else data[0]
    return op == 0xEB or 0x70 <= op <= 0x7F or 0xE0 <= op <= 0xE3


def encode(insn: Instruction, lookup: Lookup, address: int, mode: int = 32) -> Encoded:
    """Encode ``insn`` at ``address``; symbols are read through ``lookup``. Raises EncodeError."""
    try:
        ops = tuple(resolve(op, lookup, address) for op in insn.operands)
        return _encode(insn, ops, address, mode)
    except (ExprError, OperandError) as exc:
        raise EncodeError(exc.message, exc.column) from None
    except table.TableError as exc:
        raise EncodeError(str(exc), insn.column) from None
    except VerifyError as exc:
        raise EncodeError(f"refusing a wrong encoding of '{insn.mnemonic}': {exc}", insn.column) from None
    except EncodeError as exc:
        if exc.column is None:
            exc.column = insn.column
        raise


def _encode(insn: Instruction, ops: tuple[Resolved, ...], address: int, mode: int) -> Encoded:
    m, prefixes = insn.mnemonic, insn.prefixes
    prefix_bytes = bytes(_PREFIX_BYTES[p] for p in prefixes)
    row = table.lookup(m, ops) if mode == 32 else None
    if row is not None:
        data = prefix_bytes + table.encode(row, ops, _memory(mode))
        verify(data, address, _expect(prefixes, m, ops, mode, row.capstone, row.digit))
        return Encoded(data, "table", row)
    if any(isinstance(op, (Far, FarMem)) for op in ops) or (m in ("jmp", "call") and any(
            isinstance(op, Mem) and op.size == "fword" for op in ops)):
        raise EncodeError(f"no verified encoding for far '{m}' with these operands"
                          + (" in 16-bit code" if mode == 16 else ""))
    branch = next((op for op in ops if isinstance(op, Branch)), None)
    target = branch.target if branch else (ops[0].value if m in BRANCHES and len(ops) == 1
                                            and isinstance(ops[0], Imm) else 0)
    if not 0 <= target < 1 << mode:
        raise EncodeError(f"branch target {target:#x} is outside the {mode}-bit address space")
    if branch is not None and branch.distance == "short" and m == "call":
        raise EncodeError("'call' has no short form")
    if branch is not None and branch.distance == "near":
        data = prefix_bytes + _near(m, branch.target, address, mode)
        verify(data, address, _expect(prefixes, m, ops, mode))
        return Encoded(data, "popek")
    if branch is not None:
        ops = tuple(Imm(op.target) if isinstance(op, Branch) else op for op in ops)
    _check_size(m, ops)
    text = " ".join(prefixes + (m,)) + (" " + ", ".join(map(keystone_text, ops)) if ops else "")
    data = keystone_bytes(text, address, mode)
    verify(data, address, _expect(prefixes, m, ops, mode))
    if branch is not None and not _is_short(data):
        raise EncodeError(f"target {branch.target:#x} is too far for a short '{m}' "
                          f"({branch.target - address - 2:+d} bytes)")
    return Encoded(data, "keystone")


def _check_size(mnemonic: str, ops: tuple[Resolved, ...]) -> None:
    if mnemonic not in SIZE_NEEDED:
        return
    sizing = [op for op in ops if isinstance(op, Reg) and op.kind in ("gpr", "xmm", "mmx")]
    if mnemonic in _SHIFTS:
        sizing = sizing[:1] if ops and isinstance(ops[0], Reg) else []   # cl is a count, not a size
    if not sizing and any(isinstance(op, Mem) and op.size is None for op in ops):
        raise EncodeError(f"operand size of '{mnemonic}' is ambiguous: write byte, word or dword ptr")
