"""Where Unicorn 2.1.4 departs from the hardware on instructions, and how the bare machine corrects it.

The bare machine is the reference every monitor is judged against, so it must behave like the CPU the SDM
describes (the one Unicorn's CPUID reports: no RTM, no AVX, no XOP, no MPX; BMI1 and BMI2 present), not
like Unicorn. Each row of ``QUIRKS`` is one difference, found by running every one- and two-byte opcode
with every ModRM ``reg`` field (register and memory forms, with and without LOCK) on the machine and
comparing with GNU objdump and the SDM (tests/test_quirks.py keeps that table honest: every row must
still differ in raw Unicorn, and be corrected on the machine).

How a correction reaches an instruction before Unicorn executes it, at no cost per instruction: the
machine scans the loaded image for every byte offset where such an instruction could start (``scan``) and
makes those addresses Unicorn *exits*. Unicorn checks exits when it translates code and stops before an
exit address without decoding the instruction there (which matters: some of these encodings abort the
whole process when Unicorn translates them). The machine then looks at the live bytes (``match``) and
does what the hardware does (``Machine._guarded``):

- ``ud``: raise #UD at the instruction, counted once like any faulting instruction;
- ``zero-extend``: ``ret imm16`` / ``retf imm16`` with imm16 >= 0x8000 — Unicorn sign-extends the
  immediate, the SDM zero-extends it; the machine lets Unicorn execute the one instruction and then adds
  0x10000 to ESP (on a 32-bit stack; a 16-bit SP wraps the same either way);
- ``machine-tsc``: ``rdtsc`` / ``rdtscp`` — Unicorn's TSC follows the host's clock (and Unicorn 2.1.4 has
  no RDTSC instruction hook); the machine lets Unicorn execute the one instruction (its CR4.TSD check, and
  rdtscp's ECX) and then puts the machine's clock at the instruction into EDX:EAX;
- ``xsetbv-checks``: ``xsetbv`` — the machine makes the SDM's checks with the live registers
  (popek.machine.xsave) and raises the hardware's fault where Unicorn's differs (#UD before #GP at CPL > 0
  without CR4.OSXSAVE; #GP(0) for XCR0[2:1] = 10b, which Unicorn accepts); otherwise Unicorn runs it;
- ``sysenter``: Unicorn steps over it without entering the kernel; the machine lets it do that (a monitor's
  hooks there run) and then carries it out as the SDM says (popek.machine.fastcall), in protected mode.

One difference is corrected where Unicorn reports it instead: ``int 6`` arrives as an invalid opcode and
becomes the software interrupt it is (``software_int6``).

Limits (named in docs/machine.md): exits are linear addresses, the ones the image was loaded at, so code
the guest writes at run time, or runs through a different paging mapping, is not scanned; such code runs
as Unicorn runs it (and a ``lock bt reg, reg`` there aborts the process, a Unicorn bug this cannot catch).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from popek.decode import LEGACY_PREFIXES

LOCK = 0xF0
UD, ZERO_EXTEND, MACHINE_TSC, XSETBV_CHECKS, SYSENTER = "ud", "zero-extend", "machine-tsc", "xsetbv-checks", "sysenter"


@dataclass(frozen=True)
class Quirk:
    name: str            # for events (``corrected``) and messages
    action: str          # UD, ZERO_EXTEND, MACHINE_TSC, XSETBV_CHECKS or SYSENTER
    hardware: str        # what the CPU does, with the SDM's reason
    unicorn: str         # what Unicorn 2.1.4 does instead (measured)


QUIRKS = {q.name: q for q in (
    Quirk("lock-not-lockable", UD,
          "#UD: LOCK is allowed only on ADD ADC AND BTC BTR BTS CMPXCHG CMPXCHG8B DEC INC NEG NOT OR SBB SUB "
          "XOR XADD XCHG with a memory destination (SDM Vol. 2A, LOCK)",
          "ignores the prefix and executes the instruction; for BT/BTS/BTR/BTC with a register operand "
          "(0F A3/AB/B3/BB, 0F BA /4-/7) it aborts the whole process while translating"),
    Quirk("pop-8f-reg", UD,
          "#UD: 8F is POP r/m32 only with ModRM.reg = 0 (XOP, the other rows, is AMD-only and not in CPUID)",
          "executes it as POP"),
    Quirk("c6-c7-reg", UD,
          "#UD: C6/C7 are MOV r/m, imm only with ModRM.reg = 0; C6 F8/C7 F8 are XABORT/XBEGIN, and CPUID "
          "reports no RTM",
          "executes XBEGIN/XABORT and the other register forms of /7"),
    Quirk("rdseed-not-in-cpuid", UD,
          "#UD: 0F C7 /7 with a register operand is RDSEED, and CPUID.07H:EBX.RDSEED[bit 18] is 0 on this CPU "
          "(SDM Vol. 2B, RDSEED: #UD if the feature flag is 0)",
          "executes it: a random value in the register, CF = 1"),
    Quirk("vex", UD,
          "#UD: C4/C5 with ModRM.mod = 3 are VEX prefixes, and CPUID reports no AVX (only the BMI1/BMI2 "
          "rows of VEX map 0F38/0F3A exist); VEX after a 66/F2/F3/LOCK prefix is #UD as well",
          "executes the following opcode as if the VEX prefix were not there"),
    Quirk("register-only-memory-form", UD,
          "#UD: MOVMSKPS/MOVMSKPD (0F 50) and the shift-by-immediate groups 0F 71/72/73 take only register "
          "operands (ModRM.mod = 3)",
          "executes the memory form"),
    Quirk("ret-imm16-zero-extended", ZERO_EXTEND,
          "RET imm16 / RETF imm16 add the immediate zero-extended to ESP (SDM Vol. 2B, RET: "
          "ESP <- ESP + SRC with SRC an unsigned 16-bit count)",
          "sign-extends the immediate: with imm16 >= 0x8000 ESP ends 0x10000 lower"),
    Quirk("tsc-from-host-clock", MACHINE_TSC,
          "RDTSC / RDTSCP load the time-stamp counter into EDX:EAX (#GP(0) at CPL > 0 when CR4.TSD = 1; SDM "
          "Vol. 2B, RDTSC). The bare machine's clock is its instruction count (the PIT ticks on it), so its "
          "TSC is that clock at the instruction: a run repeats",
          "returns a value derived from the host's clock: two runs of the same guest read different values"),
    Quirk("xsetbv-checks", XSETBV_CHECKS,
          "XSETBV raises #UD when CR4.OSXSAVE = 0 (before the #GP(0) at CPL > 0), and #GP(0) when EDX:EAX sets "
          "XCR0[2:1] to 10b: AVX state needs SSE state (SDM Vol. 2B, XSETBV)",
          "raises #GP(0) at CPL > 0 whatever CR4.OSXSAVE says, and writes XCR0 = 5 (x87 and AVX state, no "
          "SSE state)"),
    Quirk("syscall-sysret-outside-64-bit-mode", UD,
          "#UD: SYSCALL and SYSRET outside 64-bit mode on this CPU (CPUID vendor GenuineIntel; SDM Vol. 2B, "
          "SYSCALL and SYSRET: #UD if not in 64-bit mode)",
          "syscall only calls its instruction hooks and goes on at the next instruction; sysret, once the "
          "guest sets EFER.SCE, returns to the selectors IA32_STAR names"),
    Quirk("sysenter-not-executed", SYSENTER,
          "SYSENTER enters CPL 0 at IA32_SYSENTER_CS:IA32_SYSENTER_EIP with SS = CS + 8 and ESP = "
          "IA32_SYSENTER_ESP, clearing VM, IF and RF; #GP(0) when IA32_SYSENTER_CS[15:2] = 0 (SDM Vol. 2B, "
          "SYSENTER)",
          "only calls its instruction hooks and goes on at the next instruction, at the same CPL"),
)}

# Lockable instructions (SDM Vol. 2A, LOCK): opcode -> ModRM.reg values allowed (None: any).
_LOCKABLE_1 = {**{op: None for op in (0x00, 0x01, 0x08, 0x09, 0x10, 0x11, 0x18, 0x19, 0x20, 0x21, 0x28, 0x29,
                                      0x30, 0x31, 0x86, 0x87)},
               **{op: frozenset(range(7)) for op in (0x80, 0x81, 0x82, 0x83)},        # not /7 (CMP)
               0xF6: frozenset({2, 3}), 0xF7: frozenset({2, 3}),                     # NOT, NEG
               0xFE: frozenset({0, 1}), 0xFF: frozenset({0, 1})}                     # INC, DEC
_LOCKABLE_0F = {**{op: None for op in (0xAB, 0xB3, 0xBB, 0xB0, 0xB1, 0xC0, 0xC1)},    # BTS BTR BTC CMPXCHG XADD
                0xBA: frozenset({5, 6, 7}), 0xC7: frozenset({1})}                     # BTS/BTR/BTC imm, CMPXCHG8B
# VEX rows that exist on this CPU (BMI1, BMI2: CPUID.07H:EBX bits 3 and 8): map -> opcodes.
_BMI = {2: frozenset({0xF2, 0xF3, 0xF5, 0xF6, 0xF7}), 3: frozenset({0xF0})}
_REGISTER_ONLY_0F = frozenset({0x50, 0x71, 0x72, 0x73})

# Bytes that can be the opcode (or the 0F xx pair) of a row above; instruction starts are found from them.
_TRIGGERS = re.compile(rb"[\xf0\x8f\xc2\xc4-\xc7\xca]|\x0f[\x05\x07\x50\x71-\x73\x31\x34\xc7]|\x0f\x01[\xf9\xd1]")
MAX_PREFIXES = 14            # an instruction is at most 15 bytes


def _split(code: bytes, offset: int) -> tuple[frozenset[int], int] | None:
    """(legacy prefixes, index of the opcode) of the instruction at ``offset``, or None past the end."""
    i, end = offset, min(len(code), offset + MAX_PREFIXES + 1)
    while i < end and code[i] in LEGACY_PREFIXES:
        i += 1
    if i >= len(code) or i == end:
        return None
    return frozenset(code[offset:i]), i


def match(code: bytes, offset: int) -> Quirk | None:
    """The row of ``QUIRKS`` that applies to the instruction starting at ``code[offset]``, or None.
    Bytes missing at the end of ``code`` make a row not apply."""
    split = _split(code, offset)
    if split is None:
        return None
    prefixes, i = split
    op = code[i]
    two_byte = op == 0x0F
    if two_byte:
        if i + 1 >= len(code):
            return None
        op, i = code[i + 1], i + 1
    modrm = code[i + 1] if i + 1 < len(code) else None
    if LOCK in prefixes:
        lockable = (_LOCKABLE_0F if two_byte else _LOCKABLE_1).get(op, ())
        if modrm is None:
            return None
        if lockable == () or modrm >> 6 == 3 or (lockable is not None and (modrm >> 3) & 7 not in lockable):
            return QUIRKS["lock-not-lockable"]
    if two_byte:
        if op in _REGISTER_ONLY_0F and modrm is not None and modrm >> 6 != 3:
            return QUIRKS["register-only-memory-form"]
        if op == 0x31 or (op == 0x01 and modrm == 0xF9):           # rdtsc, rdtscp
            return QUIRKS["tsc-from-host-clock"]
        if op == 0x01 and modrm == 0xD1 and not prefixes & {0x66, 0xF2, 0xF3}:   # xsetbv (#UD with those)
            return QUIRKS["xsetbv-checks"]
        if op == 0x34:
            return QUIRKS["sysenter-not-executed"]
        if op in (0x05, 0x07):
            return QUIRKS["syscall-sysret-outside-64-bit-mode"]
        if op == 0xC7 and modrm is not None and modrm >> 3 == 0x1F and not prefixes & {0xF2, 0xF3}:
            return QUIRKS["rdseed-not-in-cpuid"]                    # (F3: RDPID, which Unicorn rejects)
        return None
    if op in (0xC2, 0xCA):
        if i + 2 < len(code) and code[i + 2] & 0x80:
            return QUIRKS["ret-imm16-zero-extended"]
        return None
    if modrm is None:
        return None
    reg, mod = (modrm >> 3) & 7, modrm >> 6
    if op == 0x8F and reg:
        return QUIRKS["pop-8f-reg"]
    if op in (0xC6, 0xC7) and reg:
        return QUIRKS["c6-c7-reg"]
    if op in (0xC4, 0xC5) and mod == 3:
        if prefixes & {0x66, 0xF2, 0xF3} or op == 0xC5:
            return QUIRKS["vex"]
        if i + 3 >= len(code):
            return None
        return None if code[i + 3] in _BMI.get(code[i + 1] & 0x1F, ()) else QUIRKS["vex"]
    return None


def scan(data: bytes, base: int = 0) -> dict[int, Quirk]:
    """Every address in ``data`` (loaded at ``base``) where an instruction matching a row could start."""
    found: dict[int, Quirk] = {}
    for hit in _TRIGGERS.finditer(data):
        at = hit.start()
        start = at
        while True:                     # the trigger itself, and each start of legacy prefixes before it
            if base + start not in found:
                quirk = match(data, start)
                if quirk is not None:
                    found[base + start] = quirk
            if start == 0 or at - start >= MAX_PREFIXES or data[start - 1] not in LEGACY_PREFIXES:
                break
            start -= 1
    return found


def software_int6(code: bytes) -> int | None:
    """The length of ``int 6`` (CD 06, after any legacy prefixes) at the start of ``code``, else None.
    Unicorn reports that instruction as an invalid opcode; on the hardware it is a software interrupt
    through IDT vector 6 like any ``int n`` (SDM Vol. 2A, INT n)."""
    split = _split(code, 0)
    if split is None:
        return None
    _prefixes, i = split
    return i + 2 if code[i:i + 2] == b"\xcd\x06" else None
