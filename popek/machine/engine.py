"""What the machine needs from libunicorn that the Python binding hides or makes slow.

Measured on unicorn 2.1.4 (CPython 3.11, x86-64 host):

1. **Register access.** The binding's ``reg_read``/``reg_write`` cost 1.4-1.9 µs each; a raw ctypes call into
   the same library costs 0.42 µs and a batch of 12 registers 0.8 µs. Hooks that fire often (exceptions,
   port I/O) use ``Engine.read``/``write``/``read_many``.
2. **How many instructions ran.** ``emu_start(count=N)`` counts instructions in ``uc->emu_counter`` (an
   internal code hook, so every guest instruction is counted, including one that faults and each iteration
   of a ``rep`` prefix plus the final check), but the API never returns it. A run that ends early (exit port,
   hlt, a fault) needs the exact number, so ``Engine.counter`` reads the field.
3. **Exception details and the repeated-#GP bug.** Unicorn hands ``UC_HOOK_INTR`` the vector only. The CPU
   state keeps the error code, whether the event came from ``int n``/``int3``/``into`` (``exception_is_int``),
   ``old_exception`` (never reset by Unicorn, so the second #GP arrives as #DF and the third stops emulation:
   upstream issues #578, #1883) and the CPL (in ``hflags``; Unicorn takes CPL from SS and refuses to load a
   more privileged SS from the API). ``Engine.settle`` saves the CPU context, sets ``old_exception`` to -1 and
   optionally the CPL, and restores it: the same thing the CPU does when it finishes delivering an event.
4. **The live CPU state.** A context save and restore costs about 1.3 µs, paid on every exception. When the
   address of Unicorn's live ``CPUX86State`` can be found, ``take_exception`` reads the error code and
   ``exception_is_int`` and clears ``old_exception`` there directly (0.1 µs): a context restore is a copy of
   that same structure, so the effect is the same. ``_find_live_state`` finds it once per process by reading
   the process's own memory through ``/proc/self/mem`` (an unmapped address fails with EIO instead of
   crashing) from each pointer in ``uc_struct``, and keeps the copy that follows a register write made
   through the API; every ``Engine`` checks the pointer again the same way. Where this is not possible the
   context path is used. The eight general registers are read and written there too (``read``/``write``:
   0.1 µs instead of 0.4; Unicorn's own reg_read/reg_write of them are plain loads and stores of those
   slots, which TCG has stored before calling any hook and reloads after a helper returns).
5. **Which addresses are counted.** ``emu_start(count=N)`` counts through a code hook that Unicorn creates
   on the first such call and keeps (``uc->count_hook``), over every address. ``Engine.count_only`` narrows
   that hook's range, so that code a monitor generates for itself (a binary translator's glue between
   translated guest instructions) is not counted as guest instructions and never ends a chunk. Unicorn
   reads the range when it translates a block: narrow it before the code outside is first run. The hook's
   ``begin``/``end`` offsets and ``count_hook``'s place in ``uc_struct`` are found by calibration too.

6. **The flags after a restore to the start of an instruction.** QEMU keeps the arithmetic flags lazily
   (``cc_op`` names the last flag-setting operation, ``cc_src``/``cc_dst`` its operands) and records
   ``cc_op`` at the start of every instruction, to put back when the state is restored there: at a fault
   inside the instruction, and at the restart of a store into the running block (the rerun of
   ``popek.machine.selfmod``). Unicorn, under a code hook (the count hook is one, on every guest
   instruction), computes the flags into ``cc_src`` in EFLAGS form right after the hook, and the
   instruction's record still names the operation before: the restored state is an operation over computed
   flags, and EFLAGS reads wrong (0x57 for 0x46 after an ``add``: upstream translate.c, ``disas_insn``,
   "Previous hook might change eflags"); a rerun computes from it again, and an ``adc`` or ``rcl`` even
   stores another value. ``settle_flags`` puts ``cc_op`` back to CC_OP_EFLAGS, which is what the state
   holds there; a fault before an instruction began (a fetch) or a trap after it completed (single-step)
   has consistent state and must not be touched.

7. **Whether a page fault came from fetching code.** Unicorn translates a whole block before running it,
   and a fetch that fails for any instruction of the block is raised at the block's first instruction,
   none of it run; a data access faults at its own instruction. Without NX the error code is the same
   for both. QEMU's TLB fill records ``env->retaddr``: the host address of the translated code that made
   the access, and 0 for every fetch of guest code. ``fault_fetching_code`` reads it (the machine then
   finds the instruction that reached the page: ``Machine._fetch_is_later``).

8. **XCR0.** Unicorn has no register id for it; ``xsetbv`` writes ``env->xcr0``. ``xcr0``/``set_xcr0``
   read and write that field, so a monitor that emulates ``xsetbv`` sets the XCR0 the guest's ``xsave``
   and ``xgetbv`` then use (popek.machine.xsave), and a scratch CPU can answer CPUID leaf 0xD for it.

9. **Segment caches.** The API reads only a segment register's selector, and writing one loads the
   descriptor the GDT or LDT holds at it. The hardware keeps what it loaded (a descriptor changed later
   does not change the segment), and ``sysenter``/``sysexit`` load fixed flat segments without reading a
   table. ``segment`` reads ``env->segs[]`` (selector, base, limit and the descriptor's flags dword, as
   QEMU's ``SegmentCache``); ``load_segment`` writes one and updates ``hflags`` as QEMU's
   ``cpu_x86_load_seg_cache`` does (CPL from SS, the 32-bit code and stack bits, ADDSEG).

None of the offsets are hard-coded. ``layout()`` finds them once per process by running a small calibration
guest (a ring-3 program that takes two #GPs and an ``int $0x80``) and checks the result: the second #GP must
arrive as #GP after the patch, and a patched CPL must let the API load a ring-0 SS. A Unicorn build where
this fails raises ``EngineError`` at machine creation instead of running guests wrongly.
"""
from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from functools import lru_cache

import unicorn
from unicorn import x86_const as X
from unicorn.unicorn_py3.arch.intel import UcRegMMR
from unicorn.unicorn_py3.unicorn import uclib

# emu_start's `until` for the calibration guest: an address no 32-bit EIP can equal. (The machine itself
# uses Unicorn's exit list, empty, instead: see Machine.__init__.)
NEVER = 1 << 63


class EngineError(RuntimeError):
    """The Unicorn library does not behave as measured (a different build): the machine cannot run."""


@dataclass(frozen=True)
class Layout:
    """Byte offsets found by calibration: ``counter`` in ``uc_struct``; the others in a saved context."""

    counter: int          # uint64 uc->emu_counter (uc->emu_count follows it)
    error_code: int       # int32 env->error_code
    is_int: int           # int32 env->exception_is_int
    old_exception: int    # int32 env->old_exception
    hflags: int           # uint32 env->hflags; bits 0-1 are the CPL
    header: int = 0       # bytes of the context before the copy of env (context offsets - header = env offsets)
    env_pointer: int | None = None   # offset in uc_struct of a pointer to (env - env_delta); None: not found
    env_delta: int = 0
    count_hook: int | None = None    # offset in uc_struct of uc->count_hook (a struct hook *); None: not found
    hook_range: int = 0              # offset of uint64 begin (end follows) in struct hook
    store_recursion: int | None = None   # offset in uc_struct of int uc->size_recur_mem; None: not found
    lazy_flags: tuple[int, int] | None = None   # context offsets of env->cc_src and env->cc_op; None: not found
    retaddr: int = 0                 # context offset of uintptr env->retaddr (0 after a fault fetching code)
    xcr0: int = 0                    # context offset of uint64 env->xcr0
    segments: int = 0                # context offset of SegmentCache env->segs[6] (ES CS SS DS FS GS)


# The calibration guest, assembled with GNU as 2.40 at 0x1000 (AT&T syntax):
#   lgdtl gdtr; ljmp $0x08,$1f; 1: mov $0x10,%ax; mov %ax,%ds; mov %ax,%ss; mov $0x8000,%esp
#   push $0x23; push $0x7000; push $0x2; push $0x1b; push $user; iret          -> ring 3
#   user: mov $0x43,%ax; mov %ax,%ds      #GP(0x40): selector beyond the GDT limit
#         mov $0x4b,%ax; mov %ax,%ds      #GP(0x48): arrives as #DF unless old_exception was cleared
#         int $0x80                       software interrupt: the hook moves to ring 0 at `kernel`
#   kernel: hlt                           ends emu_start at CPL 0 (at CPL 3 it would be #GP)
#   gdt: null, 0x08 code DPL0, 0x10 data DPL0, 0x1b code DPL3, 0x23 data DPL3; gdtr at 0x1068
_CAL_BASE = 0x1000
_CAL_CODE = bytes.fromhex(
    "0f011568100000ea0e100000080066b810008ed88ed0bc008000006a2368007000006a026a1b682c100000cf"
    "66b843008ed866b84b008ed8cd80f48d742600900000000000000000ffff0000009bcf00ffff00000093cf00"
    "ffff000000fbcf00ffff000000f3cf00270040100000")
_CAL_FAULTS = (0x1030, 0x1036)                   # EIPs of the two faulting movs (#GP(0x40), #GP(0x48))
_CAL_KERNEL = 0x103A
_CAL_INSTRUCTIONS = 18                           # up to and including the hlt
_CAL_COUNT = 1000


def _i32(blob: bytes, at: int) -> int:
    return struct.unpack_from("<i", blob, at)[0]


def _context_address(ctx) -> int:
    return ctypes.cast(ctx.context, ctypes.c_void_p).value


@lru_cache(maxsize=1)
def layout() -> Layout:
    """Find the offsets (once per process; a property of the library build, not of a run)."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, 0x10000)
    uc.mem_write(_CAL_BASE, _CAL_CODE)
    ctx = uc.context_save()
    address, size = _context_address(ctx), ctx.size
    before = ctypes.string_at(address, size)
    seen: list[tuple[int, bytes]] = []
    found: dict[str, int] = {}

    def candidates(test) -> list[int]:
        return [at for at in range(0, size - 4, 4) if test(at)]

    def on_intr(uc, vector, _):
        uc.context_update(ctx)
        blob = ctypes.string_at(address, size)
        seen.append((vector, blob))
        if len(seen) == 1:          # first #GP at CPL 3: find old_exception, error_code, hflags
            old = candidates(lambda at: _i32(before, at) == -1 and _i32(blob, at) == 13)
            err = candidates(lambda at: _i32(before, at) == 0 and _i32(blob, at) == 0x40)
            hfl = candidates(lambda at: _i32(before, at) & 3 == 0 and _i32(blob, at) & 3 == 3
                             and _i32(blob, at) & 0x80 and _i32(before, at) & 0x80)   # HF_PE set in both
            if len(old) != 1 or not err or not hfl:
                raise EngineError(f"calibration: old_exception {old}, error_code {err}, hflags {hfl}")
            found["old_exception"], found["errs"], found["hflags"] = old[0], err, hfl
        elif len(seen) == 2:        # second #GP: must not have become #DF
            if vector != 13:
                raise EngineError(f"calibration: clearing old_exception did not work (vector {vector})")
            err = [at for at in found.pop("errs") if _i32(blob, at) == 0x48]
            hfl = [at for at in found["hflags"] if _i32(blob, at) & 3 == 3]
            if len(err) != 1 or len(hfl) != 1:
                raise EngineError(f"calibration: error_code {err}, hflags {hfl}")
            found["error_code"], found["hflags"] = err[0], hfl[0]
        else:                       # int $0x80: exception_is_int follows error_code (int, int)
            at = found["error_code"] + 4
            if vector != 0x80 or _i32(blob, at) != 1 or _i32(seen[0][1], at) != 0:
                raise EngineError("calibration: exception_is_int not found next to error_code")
            found["is_int"] = at
            hf = ctypes.c_uint32.from_address(address + found["hflags"])
            hf.value &= ~3          # CPL 0, so that the API accepts a ring-0 SS and CS
            uc.context_restore(ctx)
            uc.reg_write(X.UC_X86_REG_SS, 0x10)
            uc.reg_write(X.UC_X86_REG_CS, 0x08)
            uc.reg_write(X.UC_X86_REG_EIP, _CAL_KERNEL)
            return
        eip = _CAL_FAULTS[len(seen) - 1]
        if uc.reg_read(X.UC_X86_REG_EIP) != eip:
            raise EngineError("calibration: a fault did not report the faulting instruction")
        ctypes.c_int32.from_address(address + found["old_exception"]).value = -1
        uc.context_restore(ctx)
        uc.reg_write(X.UC_X86_REG_EIP, eip + 2)

    uc.hook_add(unicorn.UC_HOOK_INTR, on_intr)
    uc.emu_start(_CAL_BASE, NEVER, count=_CAL_COUNT)
    if len(seen) != 3 or uc.reg_read(X.UC_X86_REG_CS) != 0x08 or uc.reg_read(X.UC_X86_REG_EIP) != _CAL_KERNEL + 1:
        raise EngineError("calibration guest did not reach ring 0 through a patched CPL")
    counter = _find_counter(uc, _CAL_INSTRUCTIONS, _CAL_COUNT)
    # A second run confirms the counter offset with different numbers (1 instruction: the hlt).
    uc.emu_start(_CAL_KERNEL, NEVER, count=_CAL_COUNT - 1)
    if _find_counter(uc, 1, _CAL_COUNT - 1) != counter:
        raise EngineError("calibration: uc->emu_counter moved between runs")
    header, pointer, delta = _find_live_state(uc)
    count_hook, hook_range = _find_count_hook(uc)
    return Layout(counter=counter, error_code=found["error_code"], is_int=found["is_int"],
                  old_exception=found["old_exception"], hflags=found["hflags"], header=header,
                  env_pointer=pointer, env_delta=delta, count_hook=count_hook, hook_range=hook_range,
                  store_recursion=_find_store_recursion(), lazy_flags=_find_lazy_flags(),
                  retaddr=_find_retaddr(), xcr0=_find_xcr0(), segments=_find_segments())


# Every TLB fill records in env->retaddr the host address of the translated code that needs it, and 0 for a
# fetch of guest code (the translator's loads and its page lookups pass 0; every data access from translated
# code or from a helper run by a guest instruction passes its return address). So at a #PF it says whether
# the fault came from translating a block, before any instruction of the block ran, or from an instruction
# running (engine notes 7). Found with paging on, page 3 not present: two data faults from different
# instructions (different host addresses), then code that falls into the page and code that jumps to it.
# Code at 0x1000: mov eax, [0x3000]; mov ebx, [0x3004]; and nop nop at 0x2ffe.
_RETADDR_CODE = ((0x1000, bytes.fromhex("a1003000008b1d04300000")), (0x2FFE, bytes.fromhex("9090")))
_RETADDR_STARTS = ((0x1000, True), (0x1005, True), (0x2FFE, False), (0x3000, False))  # (EIP, data fault)


def _find_retaddr() -> int:
    blobs = [_retaddr_blob(start) for start, _ in _RETADDR_STARTS]     # (one Unicorn each: no #DF between)
    if not all(blobs):
        raise EngineError("calibration: the page faults for env->retaddr did not arrive as #PF")
    q = lambda blob, at: struct.unpack_from("<Q", blob, at)[0]           # noqa: E731
    data = [blob for blob, (_, is_data) in zip(blobs, _RETADDR_STARTS) if is_data]
    fetch = [blob for blob, (_, is_data) in zip(blobs, _RETADDR_STARTS) if not is_data]
    found = [at for at in range(0, len(blobs[0]) - 7, 8)
             if all(q(b, at) == 0 for b in fetch) and all(q(b, at) > 0x10000 for b in data)
             and len({q(b, at) for b in data}) == len(data)]
    if len(found) != 1:
        raise EngineError(f"calibration: env->retaddr not found ({found})")
    return found[0]


def _retaddr_blob(start: int) -> bytes | None:
    """The saved context at the #PF of the calibration code run from ``start`` (None: no #PF)."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, 0x10000)
    for address, code in _RETADDR_CODE:
        uc.mem_write(address, code)
    uc.mem_write(0x8000, struct.pack("<I", 0x9003))                          # page directory -> table
    uc.mem_write(0x9000, b"".join(struct.pack("<I", 0 if page == 3 else page << 12 | 3) for page in range(16)))
    uc.reg_write(X.UC_X86_REG_CR3, 0x8000)
    uc.reg_write(X.UC_X86_REG_CR0, uc.reg_read(X.UC_X86_REG_CR0) | 0x80000001)
    seen: list[bytes] = []

    def on_intr(uc, vector, _):
        ctx = uc.context_save()
        if vector == 14:
            seen.append(ctypes.string_at(_context_address(ctx), ctx.size))
        uc.emu_stop()

    uc.hook_add(unicorn.UC_HOOK_INTR, on_intr)
    uc.emu_start(start, NEVER, count=10)
    return seen[0] if seen else None


# env->xcr0 after `xsetbv` with EAX = 1, 3 and 7, one Unicorn each.
_XSETBV = bytes.fromhex("0f01d1f4")             # xsetbv; hlt
_XCR0_VALUES = (1, 3, 7)


def _find_xcr0() -> int:
    blobs = [_xcr0_blob(value) for value in _XCR0_VALUES]
    found = [at for at in range(0, len(blobs[0]) - 7, 8)
             if all(struct.unpack_from("<Q", blob, at)[0] == value for blob, value in zip(blobs, _XCR0_VALUES))]
    if len(found) != 1:
        raise EngineError(f"calibration: env->xcr0 not found ({found})")
    return found[0]


def _xcr0_blob(value: int) -> bytes:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, _XSETBV)
    uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | 1 << 18)       # OSXSAVE
    for reg, v in ((X.UC_X86_REG_EAX, value), (X.UC_X86_REG_EDX, 0), (X.UC_X86_REG_ECX, 0)):
        uc.reg_write(reg, v)
    uc.emu_start(0x1000, NEVER, count=2)
    uc.reg_write(X.UC_X86_REG_EAX, 0x9E3779B1)     # (EAX held the value: regs[] come first in env)
    ctx = uc.context_save()
    return ctypes.string_at(_context_address(ctx), ctx.size)


# QEMU's SegmentCache: uint32 selector, target_ulong base (64-bit on this x86-64 build), uint32 limit, uint32
# flags (the descriptor's high dword); env->segs[] holds them in QEMU's order R_ES, R_CS, R_SS, R_DS, R_FS,
# R_GS. Found from six descriptors with distinct bases and limits loaded through the API in protected mode.
SEGMENT_ORDER = ("es", "cs", "ss", "ds", "fs", "gs")
_SEGMENT_CACHE = struct.Struct("<I4xQII")
_SEGMENT_REGS = (X.UC_X86_REG_ES, X.UC_X86_REG_CS, X.UC_X86_REG_SS, X.UC_X86_REG_DS, X.UC_X86_REG_FS,
                 X.UC_X86_REG_GS)
# (selector, base, limit - 1 in 4 KiB pages, type): ES CS SS DS FS GS; CS is code, the others data.
_SEGMENT_PROBES = ((0x18, 0x110000, 0x11, 3), (0x08, 0x220000, 0x22, 0xB), (0x20, 0x330000, 0x33, 3),
                   (0x28, 0x440000, 0x44, 3), (0x30, 0x550000, 0x55, 3), (0x38, 0x660000, 0x66, 3))


@dataclass(frozen=True)
class SegmentCache:
    """A segment register as the CPU holds it (engine notes 9)."""

    selector: int
    base: int
    limit: int
    flags: int            # the descriptor's high dword: type, S, DPL, P, AVL, L, D/B, G (and base bits)

    @property
    def big(self) -> bool:
        return bool(self.flags & DESC_B)

    @property
    def dpl(self) -> int:
        return (self.flags >> 13) & 3


DESC_B = 1 << 22
_HF_CPL, _HF_CS32, _HF_SS32, _HF_ADDSEG, _HF_CS64 = 3, 1 << 4, 1 << 5, 1 << 6, 1 << 15


def _find_segments() -> int:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, 0x10000)
    gdt = bytearray(8 * 8)
    for selector, base, pages, kind in _SEGMENT_PROBES:
        high = (base >> 16 & 0xFF) | (base & 0xFF000000) | kind << 8 | 0x1 << 12 | 1 << 15 | 0xC << 20
        struct.pack_into("<II", gdt, selector, (base & 0xFFFF) << 16 | pages, high | (pages >> 16 & 0xF) << 16)
    uc.mem_write(0x3000, bytes(gdt))
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x3000, len(gdt) - 1, 0))
    uc.reg_write(X.UC_X86_REG_CR0, uc.reg_read(X.UC_X86_REG_CR0) | 1)
    for reg, (selector, *_) in zip(_SEGMENT_REGS, _SEGMENT_PROBES):
        uc.reg_write(reg, selector)
    ctx = uc.context_save()
    blob = ctypes.string_at(_context_address(ctx), ctx.size)
    want = [(selector, base, (pages << 12) | 0xFFF) for selector, base, pages, _ in _SEGMENT_PROBES]
    size = _SEGMENT_CACHE.size
    found = [at for at in range(0, len(blob) - 6 * size, 8)
             if all(_SEGMENT_CACHE.unpack_from(blob, at + i * size)[:3] == w for i, w in enumerate(want))]
    if len(found) != 1:
        raise EngineError(f"calibration: env->segs not found ({found})")
    return found[0]


def write_context_field(uc: unicorn.Uc, offset: int, value: int) -> None:
    """Write uint64 ``value`` at context offset ``offset`` of ``uc``'s CPU (a field with no register id)."""
    ctx = uc.context_save()
    ctypes.c_uint64.from_address(_context_address(ctx) + offset).value = value
    uc.context_restore(ctx)


# An unaligned store into a page holding translated code is made a byte at a time, with Unicorn's write hooks
# off (uc->size_recur_mem = the store's size) until the last byte; a byte that lands in the block running
# leaves through QEMU's restart and the field keeps the size: every later write hook stays silent
# (popek.machine.selfmod). Found as the one uc_struct word such a store leaves 4 (a dword) and 2 (a word).
# Code at 0x2000: mov [0x2007], eax (or ax), into the nops after it (eax holds nops), then hlt.
_RECURSION_PROBES = ((bytes.fromhex("a307200000"), 0x90909090, 4), (bytes.fromhex("66a307200000"), 0x9090, 2))


def _find_store_recursion() -> int | None:
    found = None
    for code, eax, size in _RECURSION_PROBES:
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
        uc.mem_map(0, 0x10000)
        uc.mem_write(0x2000, code + b"\x90" * 8 + b"\xf4")
        uc.reg_write(X.UC_X86_REG_EAX, eax)
        before = _pread(uc._uch.value, 8192)
        uc.emu_start(0x2000, NEVER, count=100)
        after = _pread(uc._uch.value, 8192)
        if before is None or after is None:
            return None
        b, a = struct.unpack("<2048i", before), struct.unpack("<2048i", after)
        hits = {4 * i for i in range(2048) if b[i] == 0 and a[i] == size}
        found = hits if found is None else found & hits
    return found.pop() if found and len(found) == 1 else None


# QEMU keeps the arithmetic flags lazily: cc_op names the last flag-setting operation and cc_dst/cc_src (and
# cc_src2) its operands; CC_OP_EFLAGS means cc_src holds them computed, in EFLAGS form (engine notes 6).
CC_OP_EFLAGS = 1
ARITHMETIC_FLAGS = 0x8D5            # OF SF ZF AF PF CF: all cc_src holds under CC_OP_EFLAGS
# add al, bl ; sub al, bl ; hlt, at 0x2000: each run to the next instruction leaves its op committed.
_LAZY_CODE = bytes.fromhex("00d828d8f4")


def _find_lazy_flags() -> tuple[int, int] | None:
    """(cc_src, cc_op) offsets in a saved context, found from what an add, a sub and an EFLAGS write leave
    there; None if they cannot be told apart."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x2000, _LAZY_CODE)

    def blob(start: int | None = None, flags: int | None = None) -> bytes:
        if start is not None:
            uc.reg_write(X.UC_X86_REG_EAX, 1)
            uc.reg_write(X.UC_X86_REG_EBX, 2)
            uc.emu_start(start, start + 2)
        if flags is not None:
            uc.reg_write(X.UC_X86_REG_EFLAGS, flags)
        ctx = uc.context_save()
        return ctypes.string_at(_context_address(ctx), ctx.size)

    added, written, subtracted = blob(start=0x2000), blob(flags=0x8D7), blob(start=0x2002)
    q = lambda data, at: struct.unpack_from("<Q", data, at)[0]           # noqa: E731
    i = lambda data, at: struct.unpack_from("<i", data, at)[0]           # noqa: E731
    # after add 1 + 2: cc_dst 3, cc_src 2; after the write: cc_src 0x8D5 (the flags), cc_op EFLAGS
    src = [at for at in range(8, len(added) - 8, 8)
           if q(added, at) == 2 and q(added, at - 8) == 3 and q(written, at) == ARITHMETIC_FLAGS]
    op = [at for at in range(0, len(added) - 4, 4)
          if i(written, at) == CC_OP_EFLAGS and 1 < i(added, at) < 64 and 1 < i(subtracted, at) < 64
          and i(added, at) != i(subtracted, at)]
    return (src[0], op[0]) if len(src) == 1 and len(op) == 1 else None


_RANGE_MARKS = (0x13579BDF, 0x2468ACE0)


def _find_count_hook(uc) -> tuple[int | None, int]:
    """(offset of uc->count_hook in uc_struct, offset of begin in struct hook), after a counted run.

    A hook added with a recognisable range shows where ``begin`` and ``end`` sit in ``struct hook`` (the
    handle the API returns is the struct's address); the count hook is the one ``uc_struct`` field that
    points to a code hook with Unicorn's "everywhere" range, begin 1 and end 0."""
    handle = uc.hook_add(unicorn.UC_HOOK_CODE, lambda *a: None, None, *_RANGE_MARKS)
    try:
        raw = _pread(handle, 128) or b""
        at = raw.find(struct.pack("<2Q", *_RANGE_MARKS))
    finally:
        uc.hook_del(handle)
    words = _pread(uc._uch.value, 8192)
    if at < 0 or words is None:
        return None, 0
    found = []
    for offset, pointer in enumerate(struct.unpack("<1024Q", words)):
        if pointer & 7 or pointer < 0x10000 or pointer == handle:
            continue
        hook = _pread(pointer + at, 16)
        if hook is not None and len(hook) == 16 and struct.unpack("<2Q", hook) == (1, 0):
            found.append(offset * 8)
    return (found[0], at) if len(found) == 1 else (None, 0)


_GPRS = (X.UC_X86_REG_EAX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX, X.UC_X86_REG_EBX, X.UC_X86_REG_ESP,
         X.UC_X86_REG_EBP, X.UC_X86_REG_ESI, X.UC_X86_REG_EDI)       # env->regs[] order (R_EAX ... R_EDI)
_MARKS = (0x9E3779B1, 0x7F4A7C15, 0x85EBCA77, 0xC2B2AE3D)     # EAX ECX EDX EBX: unlikely anywhere else
_MARK_REGS = (X.UC_X86_REG_EAX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX, X.UC_X86_REG_EBX)
_SCAN = 0x10000                                               # bytes read after each candidate pointer
PAGE_BYTES = 0x1000


def _pread(address: int, size: int) -> bytes | None:
    """Our own memory, or None where it is not mapped (never a crash)."""
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.pread(fd, size, address)
    except (OSError, OverflowError):
        return None
    finally:
        os.close(fd)


def _live_state_at(uc, address: int) -> bool:
    """True when ``address`` holds the live env: it follows a register written through the API. EAX is
    put back (a scan for the marks in the live env must still find them after a copy was tried)."""
    saved = uc.reg_read(X.UC_X86_REG_EAX)
    try:
        for value in (0x0BADF00D, 0x5EED1E55):
            uc.reg_write(X.UC_X86_REG_EAX, value)
            if _pread(address, 8) != struct.pack("<Q", value):
                return False
        return True
    finally:
        uc.reg_write(X.UC_X86_REG_EAX, saved)


def _pread_mapped(address: int, size: int) -> bytes:
    """Up to ``size`` bytes of our own memory from ``address``, as far as it is mapped (a read across the
    end of a mapping fails whole, and where the heap ends moves from run to run)."""
    out = b""
    while len(out) < size:
        at = address + len(out)
        page = _pread(at, min(PAGE_BYTES - at % PAGE_BYTES, size - len(out)))    # (never across a page)
        if not page:
            break
        out += page
    return out


def _live_candidates(uc) -> list[tuple[int, int]]:
    """(offset in uc_struct of a pointer, env - that pointer) for every pointer near the live env of ``uc``."""
    for reg, value in zip(_MARK_REGS, _MARKS):
        uc.reg_write(reg, value)
    needle = struct.pack("<4Q", *_MARKS)        # env starts with regs[], 64-bit slots, in this order
    words = _pread(uc._uch.value, 4096)
    if words is None:
        return []
    found = []
    for offset, pointer in enumerate(struct.unpack("<512Q", words)):
        if pointer & 7 or pointer < 0x10000:
            continue
        data = _pread_mapped(pointer, _SCAN)
        at = data.find(needle)
        while at >= 0:                          # several copies (saved contexts): keep the live one
            if _live_state_at(uc, pointer + at):
                found.append((offset * 8, at))
            at = data.find(needle, at + 8)
    return found


def _find_live_state(uc) -> tuple[int, int | None, int]:
    """(context header size, offset in uc_struct of a pointer near the live env, env - that pointer).

    Only a pointer whose distance to the env is a property of the build will do (uc->cpu: the env is a
    member of the CPU object); a heap pointer that happens to lie below the env in one instance does not
    in the next, so a candidate must hold in a second, fresh instance too."""
    for reg, value in zip(_MARK_REGS, _MARKS):
        uc.reg_write(reg, value)
    ctx = uc.context_save()
    header = ctypes.string_at(_context_address(ctx), ctx.size).find(struct.pack("<4Q", *_MARKS))
    if header < 0:
        return 0, None, 0
    other = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    again = set(_live_candidates(other))
    stable = [found for found in _live_candidates(uc) if found in again]
    if not stable:
        return header, None, 0
    return header, *stable[0]


def _find_counter(uc, executed: int, count: int) -> int:
    """The offset of the adjacent (emu_counter, emu_count) uint64 pair in uc_struct."""
    words = (ctypes.c_uint64 * 512).from_address(uc._uch.value)    # uc_struct is larger than 4 KiB
    hits = [i * 8 for i in range(511) if words[i] == executed and words[i + 1] == count]
    if len(hits) != 1:
        raise EngineError(f"calibration: uc->emu_counter not found ({hits})")
    return hits[0]


class Engine:
    """Fast register access, the instruction counter and exception state for one ``Uc``."""

    def __init__(self, uc: unicorn.Uc):
        self.layout = layout()
        self.uc = uc
        self._uch = uc._uch
        self._buf = ctypes.c_uint64()
        self._ref = ctypes.byref(self._buf)
        self._read_fn = uclib.uc_reg_read
        self._write_fn = uclib.uc_reg_write
        self._ctx = uc.context_save()          # reused by settle(): context_update allocates nothing
        self._ctx_address = _context_address(self._ctx)
        self._counter = ctypes.c_uint64.from_address(self._uch.value + self.layout.counter)
        self._count_limit = ctypes.c_uint64.from_address(self._uch.value + self.layout.counter + 8)
        at = self.layout.store_recursion
        self._recursion = None if at is None else ctypes.c_int32.from_address(self._uch.value + at)
        self._batches: dict[tuple[int, ...], tuple] = {}
        self._mmr = UcRegMMR()
        self._gprs: dict[int, ctypes.c_uint64] = {}
        self._live = self._live_fields()
        self._counted = (0, 0xFFFFFFFF)            # count_only's range
        self._lazy = self._lazy_fields()
        self._retaddr = self._live_u64(self.layout.retaddr)
        self._xcr0 = self._live_u64(self.layout.xcr0)
        self._env_context = self._live_context_address()
        self._segment_bases = {name: ctypes.c_uint64.from_address(self._env_context + self.layout.segments
                                                                   + i * _SEGMENT_CACHE.size + 8)
                               for i, name in enumerate(SEGMENT_ORDER)} if self._env_context else {}

    def _live_context_address(self) -> int:
        """The address that context offsets are relative to in the live env (0 without a live env)."""
        if self._live is None:
            return 0
        lay = self.layout
        return ctypes.c_uint64.from_address(self._uch.value + lay.env_pointer).value + lay.env_delta - lay.header

    def _live_u64(self, offset: int) -> ctypes.c_uint64 | None:
        """A view of the live env's uint64 at context offset ``offset``; None without a live env."""
        at = self._live_context_address()
        return ctypes.c_uint64.from_address(at + offset) if at else None

    def _live_fields(self) -> tuple | None:
        """(is_int, error_code, old_exception) as ctypes views of the live env, or None (context path)."""
        lay = self.layout
        if lay.env_pointer is None:
            return None
        env = ctypes.c_uint64.from_address(self._uch.value + lay.env_pointer).value + lay.env_delta
        saved = self.read(X.UC_X86_REG_EAX)
        ok = _live_state_at(self.uc, env)
        self.write(X.UC_X86_REG_EAX, saved)
        if not ok:
            return None
        self._gprs = self._live_gprs(env)
        at = env - lay.header
        return (ctypes.c_int32.from_address(at + lay.is_int), ctypes.c_int32.from_address(at + lay.error_code),
                ctypes.c_int32.from_address(at + lay.old_exception))

    def _lazy_fields(self) -> tuple | None:
        """(cc_src, cc_op) as views of the live env, checked by an EFLAGS write through the API (which sets
        cc_src to the flags and cc_op to CC_OP_EFLAGS); None where the offsets or the live env are unknown."""
        lay = self.layout
        if lay.lazy_flags is None or lay.env_pointer is None or self._live is None:
            return None
        at = ctypes.c_uint64.from_address(self._uch.value + lay.env_pointer).value + lay.env_delta - lay.header
        src, op = (ctypes.c_uint64.from_address(at + lay.lazy_flags[0]),
                   ctypes.c_int32.from_address(at + lay.lazy_flags[1]))
        saved = self.read(X.UC_X86_REG_EFLAGS)
        self.write(X.UC_X86_REG_EFLAGS, saved | ARITHMETIC_FLAGS)
        ok = src.value == ARITHMETIC_FLAGS and op.value == CC_OP_EFLAGS
        self.write(X.UC_X86_REG_EFLAGS, saved)
        return (src, op) if ok else None

    def settle_flags(self, address: int) -> bool:
        """The state was restored to the start of the instruction at ``address`` (a fault inside it, or the
        restart of a store into its block: engine notes 6): make EFLAGS read the flags computed there. Only
        for an instruction translated under the count hook, and only when ``cc_src`` can be flags at all.
        True when it changed the state."""
        lazy = self._lazy
        if lazy is None or not self._counted[0] <= address <= self._counted[1]:
            return False
        src, op = lazy
        if op.value == CC_OP_EFLAGS or src.value & ~ARITHMETIC_FLAGS:
            return False
        op.value = CC_OP_EFLAGS
        return True

    def _live_gprs(self, env: int) -> dict[int, ctypes.c_uint64]:
        """The eight general registers as views of the live env (``regs[]``, in encoding order, 64-bit
        slots), each checked by a write through the API; {} if one does not follow."""
        views = {}
        for i, reg in enumerate(_GPRS):
            saved = self.read(reg)
            view = ctypes.c_uint64.from_address(env + 8 * i)
            self.write(reg, 0x5A5A0000 + i)
            ok = view.value == 0x5A5A0000 + i
            self.write(reg, saved)
            if not ok:
                return {}
            views[reg] = view
        return views

    def read(self, reg: int) -> int:
        view = self._gprs.get(reg)
        if view is not None:                   # 0.1 µs instead of 0.4: Unicorn's reg_read is this load
            return view.value & 0xFFFFFFFF
        self._buf.value = 0                    # segment registers fill 2 bytes, GPRs 4
        if self._read_fn(self._uch, reg, self._ref):
            raise EngineError(f"uc_reg_read({reg}) failed")
        return self._buf.value

    def write(self, reg: int, value: int) -> None:
        view = self._gprs.get(reg)
        if view is not None:                   # Unicorn's reg_write is this store (EIP and the others do more)
            view.value = value & 0xFFFFFFFF
            return
        self._buf.value = value & 0xFFFFFFFF
        if self._write_fn(self._uch, reg, self._ref):
            # Segment loads are validated by the machine first; a refusal here is a machine bug. Not a
            # UcError: the machine reads those from emu_start as the guest's memory faults.
            raise EngineError(f"uc_reg_write({reg}, {value:#x}) refused")

    def read_many(self, regs: tuple[int, ...]) -> list[int]:
        """Several registers in one call (uc_reg_read_batch: 0.8 µs for 12). Segment registers come back
        in the low 16 bits of a zeroed slot."""
        batch = self._batches.get(regs)
        if batch is None:
            n = len(regs)
            values = (ctypes.c_uint64 * n)()
            pointers = (ctypes.c_void_p * n)(*[ctypes.addressof(values) + 8 * i for i in range(n)])
            batch = self._batches[regs] = ((ctypes.c_int * n)(*regs), pointers, values, n)
        ids, pointers, values, n = batch
        ctypes.memset(values, 0, 8 * n)
        if uclib.uc_reg_read_batch(self._uch, ids, pointers, n):
            raise EngineError("uc_reg_read_batch failed")
        return values[:]

    def read_table(self, reg: int) -> tuple[int, int, int]:
        """(selector, base, limit) of GDTR, IDTR, LDTR or TR (the binding's version costs 5 µs)."""
        mmr = self._mmr
        if self._read_fn(self._uch, reg, ctypes.byref(mmr)):
            raise EngineError(f"uc_reg_read({reg}) failed")
        return mmr.selector, mmr.base & 0xFFFFFFFF, mmr.limit

    def counter(self) -> int:
        """Instructions counted so far by the current (or last) ``emu_start``."""
        return self._counter.value

    def count_limit(self) -> int:
        """The current ``emu_start``'s count limit (``count``, unless ``stop_at_next`` lowered it)."""
        return self._count_limit.value

    def extend_limit(self) -> None:
        """Let the current ``emu_start`` count one more instruction (one attempt it counted was not one)."""
        self._count_limit.value += 1

    def store_recursion(self) -> int:
        """Unicorn's ``size_recur_mem``: not 0 while write hooks are off (engine notes above
        ``_find_store_recursion``); 0 where the field was not found."""
        return self._recursion.value if self._recursion is not None else 0

    def clear_store_recursion(self) -> None:
        if self._recursion is not None:
            self._recursion.value = 0

    def stop_at_next(self) -> None:
        """End the current ``emu_start`` before the next counted instruction, letting the current one
        finish: its count limit becomes what has been counted (Unicorn's count hook stops the run when
        the counter passes the limit, before the instruction it is counting)."""
        self._count_limit.value = self._counter.value

    def count_only(self, begin: int, end: int) -> bool:
        """Count (and end ``count``-limited runs on) only instructions at addresses in [begin, end].

        False when it cannot be done: Unicorn creates its count hook in the first ``emu_start`` with a
        count (run one first), or calibration did not find it. Blocks already translated keep counting
        as before: call this before the code outside the range runs."""
        lay = self.layout
        if lay.count_hook is None:
            return False
        hook = ctypes.c_uint64.from_address(self._uch.value + lay.count_hook).value
        if not hook:
            return False
        ctypes.c_uint64.from_address(hook + lay.hook_range).value = begin
        ctypes.c_uint64.from_address(hook + lay.hook_range + 8).value = end
        self._counted = (begin, end)
        return True

    def take_exception(self) -> tuple[bool, int]:
        """``(software, error_code)`` of the exception being reported to ``UC_HOOK_INTR``; clears
        ``old_exception`` as ``settle`` does (directly in the live state, else one context save and restore)."""
        live = self._live
        if live is not None:
            is_int, error_code, old_exception = live
            old_exception.value = -1
            return is_int.value != 0, error_code.value & 0xFFFFFFFF
        self.uc.context_update(self._ctx)
        a, lay = self._ctx_address, self.layout
        software = ctypes.c_int32.from_address(a + lay.is_int).value != 0
        error_code = ctypes.c_int32.from_address(a + lay.error_code).value & 0xFFFFFFFF
        ctypes.c_int32.from_address(a + lay.old_exception).value = -1
        self.uc.context_restore(self._ctx)
        return software, error_code

    def fault_fetching_code(self) -> bool:
        """From ``UC_HOOK_INTR`` at a #PF: whether it came from fetching guest code as Unicorn translated a
        block (none of the block ran; EIP is the block's first instruction), not from a data access of the
        instruction at EIP (engine notes 7)."""
        live = self._retaddr
        if live is not None:
            return live.value == 0
        self.uc.context_update(self._ctx)
        return ctypes.c_uint64.from_address(self._ctx_address + self.layout.retaddr).value == 0

    def xcr0(self) -> int:
        live = self._xcr0
        if live is not None:
            return live.value
        self.uc.context_update(self._ctx)
        return ctypes.c_uint64.from_address(self._ctx_address + self.layout.xcr0).value

    def set_xcr0(self, value: int) -> None:
        """XCR0 as ``xsetbv`` leaves it (the caller has made the SDM's checks: popek.machine.xsave)."""
        if self._xcr0 is not None:
            self._xcr0.value = value
        else:
            write_context_field(self.uc, self.layout.xcr0, value)

    def segment_base(self, name: str) -> int:
        """The base of segment register ``name`` as loaded (engine notes 9)."""
        view = self._segment_bases.get(name)
        return view.value if view is not None else self.segment(name).base

    def segment(self, name: str) -> SegmentCache:
        """The cache of segment register ``name`` (engine notes 9)."""
        at = self.layout.segments + SEGMENT_ORDER.index(name) * _SEGMENT_CACHE.size
        if self._live is not None:
            raw = ctypes.string_at(self._env_context + at, _SEGMENT_CACHE.size)
        else:
            self.uc.context_update(self._ctx)
            raw = ctypes.string_at(self._ctx_address + at, _SEGMENT_CACHE.size)
        return SegmentCache(*_SEGMENT_CACHE.unpack(raw))

    def load_segment(self, name: str, cache: SegmentCache) -> None:
        """Load segment register ``name`` with ``cache`` without reading a descriptor table, and the hidden
        flags as QEMU's cpu_x86_load_seg_cache sets them for 32-bit (not long) mode."""
        cr0, eflags = self.read(X.UC_X86_REG_CR0), self.read(X.UC_X86_REG_EFLAGS)
        self.uc.context_update(self._ctx)
        a, lay, size = self._ctx_address, self.layout, _SEGMENT_CACHE.size
        at = lay.segments + SEGMENT_ORDER.index(name) * size
        ctypes.memmove(a + at, _SEGMENT_CACHE.pack(cache.selector, cache.base, cache.limit, cache.flags), size)
        hflags = ctypes.c_uint32.from_address(a + lay.hflags)
        hf = hflags.value
        if name == "cs":
            hf = (hf & ~(_HF_CS32 | _HF_CS64)) | (_HF_CS32 if cache.big else 0)
        if name == "ss":
            hf = (hf & ~_HF_CPL) | cache.dpl
        cached = {n: SegmentCache(*_SEGMENT_CACHE.unpack(ctypes.string_at(a + lay.segments + i * size, size)))
                  for i, n in enumerate(SEGMENT_ORDER) if n in ("es", "ss", "ds")}
        if not cr0 & 1 or eflags & (1 << 17) or not hf & _HF_CS32:
            addseg = _HF_ADDSEG
        else:
            addseg = _HF_ADDSEG if any(c.base for c in cached.values()) else 0
        hflags.value = (hf & ~(_HF_SS32 | _HF_ADDSEG)) | (_HF_SS32 if cached["ss"].big else 0) | addseg
        self.uc.context_restore(self._ctx)

    def settle(self, cpl: int | None = None) -> None:
        """Finish an event as the CPU does: clear ``old_exception`` and, if given, set the CPL.

        Precondition: no register was written since the last context_update that matters here, because
        the context is saved now and restored whole. Setting the CPL only makes the API accept the
        selectors the caller loads next; loading SS then sets the CPL again from the descriptor.
        """
        self.uc.context_update(self._ctx)
        a, lay = self._ctx_address, self.layout
        ctypes.c_int32.from_address(a + lay.old_exception).value = -1
        if cpl is not None:
            hf = ctypes.c_uint32.from_address(a + lay.hflags)
            hf.value = (hf.value & ~3) | cpl
        self.uc.context_restore(self._ctx)
