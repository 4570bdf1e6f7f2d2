"""Exact instruction counts for guests that store into the code they are running.

Unicorn (QEMU) runs a store into the translation block it is executing by dropping the block and running
the instruction again from its start, alone; the store is made once, but the count hook fires twice, so
``guest_instructions`` (and the PIT, which ticks on counted instructions) ran one ahead of the CPU for
every such store (tests/regressions/smc-store-counted-twice.s; bench images: 31 of 2,400 random images).
Where the blocks end is QEMU's business, so a monitor cannot imitate it; the machine corrects it instead:

- **Code pages.** Block hooks over every linear page no block has begun in yet (their ranges are the
  complement of the code pages) call back once per new page, before its first block runs; the page's
  physical frame joins the write hooks' ranges. Stores to other pages cost nothing (measured).
- **The second attempt.** A store into a code page is seen by a write hook before it is made; the rerun
  shows as a second store by the same instruction of the same value at the same place, with Unicorn's
  counter one higher. An instruction with several stores (a helper's: fnstenv makes 7, fnsave 27) is
  told by the first store of each attempt, which the rerun makes again first. That attempt is taken off
  the count and the chunk's limit raised by one, so the chunk still runs as many instructions as it was
  given. Before the rerun runs, its flags are settled, and an ``rcl``/``rcr`` gets back the carry its first
  attempt read (``_put_back_carry``).
- **A rerun cut off.** When the first attempt was the last one the limit allowed, Unicorn stops before
  the rerun: EIP is still at the instruction, its store not made, and the count one too high; it is taken
  off. The next chunk starts at that instruction; with a limit of 1 its rerun would be cut off again, for
  ever, if the block Unicorn now translates there holds the bytes it writes (asked with
  ``ctl_request_cache``), so that chunk gets a limit of 2 and its rerun does not raise it.

Not seen: a store through another linear mapping of a code page that no block ran through yet (its frame is
not watched until a block begins in it). A store of the value the bytes already hold, cut off by the limit,
by an instruction that can stay at its own address (a rep string instruction, a call or int n onto
itself) cannot be told from one that was made: the count is then one high, as before.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from unicorn import x86_const as X

from popek.decode import LEGACY_PREFIXES, decode_at
from popek.machine.faults import GuestFault
from popek.machine.memory import CR0_PG
from popek.machine.rangehooks import BLOCK, WRITE, RangeHooks, merge

if TYPE_CHECKING:
    from popek.machine.machine import Machine

PAGE = 0x1000
TOP = 1 << 32
MAX_WRITE_HOOKS = 4      # each write hook costs every store a range check: code frames share a few
WATCH_GAP = 4 * PAGE     # code frames closer than this share a write hook
_CONTROL = (X.UC_X86_REG_CR0, X.UC_X86_REG_CR3, X.UC_X86_REG_CR4)
STAYS = frozenset({"call", "lcall", "int", "int1", "int3", "into"})    # may store and land on themselves
IMM8 = "imm8"
_ROTATE_COUNT = {0xD0: 1, 0xD1: 1, 0xD2: None, 0xD3: None, 0xC0: IMM8, 0xC1: IMM8}   # group 2: count (None: CL)


class SelfModifyingStores:
    """The correction above, for one machine. ``begin``/``end`` bracket every ``emu_start``."""

    def __init__(self, machine: Machine):
        self.m = machine
        self.code: list[tuple[int, int]] = []          # linear [start, end) ranges blocks have begun in
        self.frames: set[int] = set()                   # their physical frame numbers
        self._blocks = RangeHooks(machine, BLOCK, self._on_block)
        self._writes = RangeHooks(machine, WRITE, self._on_store)
        self._rerun = RangeHooks(machine, BLOCK, self._on_rerun)  # the instruction of an unaligned store
        self._blocks.cover([(0, TOP)])
        self.corrected = 0                              # attempts taken off the count
        self.extended = 0                               # limit raised in this chunk
        self._store: tuple | None = None                # (eip, address, size, value, counter): the first
                                                        # store of the last attempt
        self._cut: tuple | None = None                  # (eip, address, size): a rerun the limit cut off
        self._alone = False                             # this chunk retries a cut store alone
        self._unaligned: tuple | None = None            # (eip, address, bytes before) of the last one
        # Told the EIP of each attempt taken off: a monitor whose own hook counts every instruction it sees
        # (emulate) saw that attempt too.
        self.on_take_off: list[Callable[[int], None]] = []

    def disable(self) -> None:
        """For a monitor that never runs guest code where it lies (bt runs it from its cache, whose blocks no
        guest store can reach): no hooks, nothing corrected."""
        for hooks in (self._blocks, self._writes, self._rerun):
            hooks.clear()

    # --- code pages ---------------------------------------------------------------------------------------
    def _on_block(self, uc, address: int, size: int, _) -> None:
        first, last = address & ~(PAGE - 1), (address + max(size, 1) - 1) & ~(PAGE - 1)
        self._add_code(first, last + PAGE)
        self._retranslate(address, size)

    def _retranslate(self, address: int, size: int) -> None:
        """Unicorn decides at translation whether a block calls the block hooks, and then calls them on every
        run of it whatever their ranges say (measured: a loop in the first block of a page called back on
        every iteration). Drop the block and end the chunk before it runs (a dropped block that ran on would
        miss a store into itself), so that it is translated again without the call."""
        self.m.uc.ctl_remove_cache(address, address + max(size, 1))
        self.m.stop_chunk()

    def _add_code(self, start: int, end: int) -> None:
        spans = self.code + [(start, min(end, TOP))]
        self.code = merge(spans, 0, len(spans))
        complement, at = [], 0
        for lo, hi in self.code:
            if lo > at:
                complement.append((at, lo))
            at = hi
        if at < TOP:
            complement.append((at, TOP))
        self._blocks.cover(complement)
        for page in range(start, end, PAGE):
            frame = self._frame_address(page)
            if frame is not None:                       # (not mapped: no store can reach it either)
                self.frames.add(frame >> 12)
        ram = self.m.memory.ram_size
        frames = [(f << 12, (f + 1) << 12) for f in sorted(self.frames) if f << 12 < ram]
        ranges = merge(frames, WATCH_GAP, MAX_WRITE_HOOKS)
        if not self._writes.covers(ranges):
            self._writes.cover(ranges)

    def _frame_address(self, linear: int) -> int | None:
        """The physical address of ``linear`` (what memory hooks report), None where it is not mapped."""
        m = self.m
        cr0, cr3, cr4 = m.engine.read_many(_CONTROL)
        if not cr0 & CR0_PG:
            return linear
        try:
            return m.memory.linear(linear, 1, cr0, cr3, cr4)
        except GuestFault:
            return None

    # --- stores -------------------------------------------------------------------------------------------
    def _on_store(self, uc, access: int, address: int, size: int, value: int, _) -> None:
        engine = self.m.engine
        counter = engine.counter()
        store = (engine.read(X.UC_X86_REG_EIP), address, size, value)
        last = self._store                  # the first store of the last attempt
        if last is not None and last[0] == store[0] and last[4] == counter:
            # another store of the same attempt (a push pair, or a helper's: fnsave makes 27): the attempt
            # is told by its first store, which its rerun makes again first
            if address & (size - 1):
                self._unaligned = (store[0], address, self.m.memory.read(address, size))
            return
        # (only a rerun stores again at the same place from the same instruction, one count later: a
        # rep string instruction moves on, an instruction that jumps to itself pushes lower)
        if last is not None and last[:3] == store[:3] and last[4] + 1 == counter:
            if last[3] != value:            # the first attempt changed state before its store (rcl's CF)
                self.m.events.count("machine-error", "smc-rerun-stored-another-value")
            self._take_off(store[0])
            if not self._alone:
                engine.extend_limit()
                self.extended += 1
            self._store = None
            self._rerun.clear()
        else:
            self._store = store + (counter,)
            # (a block that begins here before this instruction is counted again is its rerun)
            self._rerun.cover([(store[0], store[0] + 1)])
            if address & (size - 1):
                self._unaligned = (store[0], address, self.m.memory.read(address, size))

    def _on_rerun(self, uc, address: int, size: int, _) -> None:
        """A block begins at the instruction of the last store into a code page. If it was not counted
        again since, this is its rerun (a block of one instruction, made for it, that runs on): the restart
        left the flags stale (engine notes 6), so settle them. An unaligned store that left through the
        restart (write hooks off) also made part of its bytes: put them back (the rerun of an xchg or add
        would read them), and turn the write hooks on again, which sees the rerun."""
        store, engine = self._store, self.m.engine
        if store is None or store[0] != address or store[4] != engine.counter():
            self._retranslate(address, size)
            return
        self.m.settle_flags(address, "smc-rerun")
        self._put_back_carry(address, store[3], store[2])
        if engine.store_recursion() and self._unaligned is not None and self._unaligned[0] == address:
            self._undo_partial()

    def _put_back_carry(self, eip: int, first_value: int, size: int) -> None:
        """An ``rcl``/``rcr`` into its own block wrote its new CF before its store was restarted, and its
        rerun rotates that CF in: another value (bench images 843). The carry it read is a bit of what its
        first attempt stored, at a place its count gives; put it back in CF for the rerun."""
        try:
            code = self.m.read_linear(eip, 15)
        except GuestFault:
            return
        i = 0
        while i < len(code) - 1 and code[i] in LEGACY_PREFIXES:
            i += 1
        op, reg = code[i], (code[i + 1] >> 3) & 7
        if op not in _ROTATE_COUNT or reg not in (2, 3) or code[i + 1] >> 6 == 3:
            return
        count = _ROTATE_COUNT[op]
        if count is None:
            count = self.m.engine.read(X.UC_X86_REG_ECX) & 0xFF
        elif count == IMM8:
            insn = decode_at(code, 0, eip, 32)
            if insn is None:
                return
            count = code[insn.size - 1]
        bits = 8 * size
        n = (count & 0x1F) % (bits + 1)
        if n == 0:
            return                              # nothing rotated: no flag written, no other value
        carry = first_value >> (n - 1 if reg == 2 else bits - n) & 1
        eflags = self.m.engine.read(X.UC_X86_REG_EFLAGS)
        if eflags & 1 != carry:
            self.m.engine.write(X.UC_X86_REG_EFLAGS, eflags & ~1 | carry)
            self.m.events.count("corrected", "carry-at-smc-rerun")

    def _undo_partial(self) -> None:
        _, address, before = self._unaligned
        self.m.memory.write(address, before)
        self.m.engine.clear_store_recursion()
        self._unaligned = None
        self._rerun.clear()

    def _may_stay(self, eip: int) -> bool:
        """Whether the instruction at ``eip`` can leave EIP at itself after a store it made."""
        try:
            insn = decode_at(self.m.read_linear(eip, 15), 0, eip, 32)
        except GuestFault:
            return True
        return insn is None or insn.mnemonic.startswith("rep") or insn.mnemonic.split()[0] in STAYS

    def _take_off(self, eip: int) -> None:
        self.m.uncount()
        for listener in self.on_take_off:
            listener(eip)
        self.corrected += 1
        self.m.events.count("corrected", "smc-rerun")

    # --- around emu_start ---------------------------------------------------------------------------------
    def begin(self, count: int) -> int:
        """Before ``emu_start``: the count limit to give it (``count``, or 2 to retry a cut store alone)."""
        self._store, self.extended, self._alone, self._unaligned = None, 0, False, None
        self._rerun.clear()
        if self._cut is None:
            return count
        eip, address, size = self._cut
        self._cut = None
        if count != 1 or eip != self.m.reg("eip"):
            return count
        try:
            pc, _, length = self.m.uc.ctl_request_cache(eip)
        except Exception:                   # noqa: BLE001 - Unicorn could not translate there: no rerun
            return count
        start = self._frame_address(pc)
        self._alone = pc == eip and start is not None and address < start + length and start < address + size
        return 2 if self._alone else count

    def end(self, counted: int) -> None:
        """After ``emu_start``: take off a rerun the limit cut off."""
        engine = self.m.engine
        stuck = engine.store_recursion()
        if self._store is None or counted <= engine.count_limit():
            if stuck:                           # (a restart whose rerun was not seen: not expected)
                engine.clear_store_recursion()
                self.m.events.count("corrected", "smc-rerun-unseen")
            return
        eip, address, size, value, counter = self._store
        if eip != self.m.reg("eip") or counter != counted - 1:
            if stuck:
                engine.clear_store_recursion()
            return
        if stuck and self._unaligned is not None and self._unaligned[0] == eip:
            self._undo_partial()
            made = False
        else:
            engine.clear_store_recursion()
            # EIP still at the instruction: it did not complete, unless it stays there when it does (the
            # next iteration of a rep string instruction, a call or int n that lands on itself); those made
            # their store, which the bytes show.
            made = self._may_stay(eip) and \
                int.from_bytes(self.m.memory.read(address, size), "little") == value & ((1 << 8 * size) - 1)
        if not made:
            self._take_off(eip)
            self.m.settle_flags(eip, "smc-rerun")
            self._cut = (eip, address, size)
