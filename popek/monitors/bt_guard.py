"""Keeping translations valid against stores, and the translation cache out of the guest's reach (for bt).

**Stores into code.** Guest stores are caught by write hooks over the physical byte ranges translations
were made from (at most MAX_WATCHED hooks: each costs every guest store a range check, measured), host
writes (emulation routines, interrupt frames) by ``Memory.on_write``. The hooks are made once and their
ranges rewritten in place in Unicorn's hook records (the offset calibrated by popek.machine.engine): a
deleted hook stays in Unicorn's list, and is checked on every store, until the ``emu_start`` it was
deleted in returns (measured: 171 rebuilds made every store 10x slower). Physical addresses, because
that is what Unicorn's memory hooks and the machine's host writes report while the guest pages. Only the
overlapping units are invalidated. A guest store into code stops the chunk before the next guest
instruction, letting the storing instruction complete (``stop_chunk(finish=True)``: Unicorn's own stop
would abandon it halfway), with RESYNC pending so that the monitor gets control back between the chunks
and drops Unicorn's stale copies then (``ctl_remove_cache`` inside a memory hook crashes Unicorn 2.1.4).

**Reads of the cache.** Unicorn refuses data reads of the execute-only cache only until the page has been
fetched from (measured), so a read hook over the cache turns a guest read into the #GP(0) the bare
machine gives for that unmapped address: the bytes the instruction would read are blanked until the fault
is delivered (nothing of the cache reaches the guest), the registers it changed are put back.
"""
from __future__ import annotations

import ctypes
from collections import Counter

import unicorn
from unicorn import x86_const as X

from popek.machine.faults import EXCEPTION, GP, Interrupt

# Not an event: what the SMC write hook leaves pending to get control back between two chunks.
RESYNC = Interrupt(-1, why="bt: translations invalidated by a guest store")
UNWATCHED = (0xFFFFFFFF, 0xFFFFFFFF)    # a hook's range that no store reaches (beyond RAM and the cache)
MAX_WATCHED = 4
WATCH_GAP = 256          # code ranges closer than this share a hook
GPRS = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")


class Guard:
    """The hooks and listeners above, for one machine and one cache."""

    def __init__(self, machine, cache, counts: Counter, key):
        self.m, self.cache, self.counts = machine, cache, counts
        self.key = key                                  # () -> the translation key now: (CPL, CS base, 32-bit)
        self.counter = ctypes.c_uint64.from_address(machine.uc._uch.value + machine.engine.layout.counter)
        self._watched: list[tuple[int, int]] = []       # the ranges the write hooks cover
        self._hooks: list[int] = []                     # write hooks (made once, ranges rewritten)
        self._spans: dict[int, list[int]] = {}          # physical page -> [first, end) byte of code in it
        self._blanked: list[tuple[int, bytes]] = []
        # The guest instruction (linear) right after a sti, mov ss or pop ss the monitor just emulated: in
        # that interrupt shadow the bare machine (QEMU) runs a translation block of that one instruction.
        self.shadow: int | None = None
        machine.uc.hook_add(unicorn.UC_HOOK_MEM_READ, self._on_cache_read, None, cache.base, cache.end - 1)
        machine.memory.on_write = self._on_host_write

    def settle(self) -> None:
        """Between chunks (from the monitor's intercept): what could not be done inside a memory hook."""
        if self.cache.stale:
            self.cache.settle()
        if self._blanked:
            for start, data in reversed(self._blanked):
                self.cache.patch(start, data)
            self._blanked = []

    def watch(self, units) -> None:
        """Cover the guest bytes of new ``units`` with the write hooks: each page's span of code, spans closer
        than WATCH_GAP sharing a hook, at most MAX_WATCHED hooks (split at the widest gaps)."""
        spans = self._spans
        grown = False
        for unit in units:
            for lo, hi in unit.physical_spans():
                span = spans.get(lo >> 12)
                if span is None:
                    spans[lo >> 12] = [lo, hi]
                    grown = True
                elif lo < span[0] or hi > span[1]:
                    span[0], span[1] = min(lo, span[0]), max(hi, span[1])
                    grown = True
        if not grown:
            return
        merged: list[list[int]] = []
        for start, end in sorted(spans.values()):
            if merged and start - merged[-1][1] <= WATCH_GAP:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        if len(merged) > MAX_WATCHED:           # keep the MAX_WATCHED - 1 widest gaps between ranges
            gaps = sorted(range(1, len(merged)), key=lambda j: merged[j][0] - merged[j - 1][1])
            cuts = sorted(gaps[len(merged) - MAX_WATCHED:])
            starts = [0] + cuts
            ends = cuts + [len(merged)]
            merged = [[merged[a][0], merged[b - 1][1]] for a, b in zip(starts, ends)]
        if all(any(h0 <= s and e <= h1 for h0, h1 in self._watched) for s, e in merged):
            return
        self._watched = [(start, end) for start, end in merged]
        for i, (start, end) in enumerate(merged):
            if i < len(self._hooks):
                self._set_range(self._hooks[i], start, end - 1)
            else:
                self._hooks.append(self.m.uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, self._on_guest_write, None,
                                                      start, end - 1))
        for handle in self._hooks[len(merged):]:
            self._set_range(handle, *UNWATCHED)

    def _set_range(self, handle: int, begin: int, end: int) -> None:
        """A memory hook's range, rewritten in Unicorn's hook record (its offset is calibrated by the
        engine, popek.machine.engine); Unicorn checks memory hooks' ranges on every access."""
        at = handle + self.m.engine.layout.hook_range
        ctypes.c_uint64.from_address(at).value = begin
        ctypes.c_uint64.from_address(at + 8).value = end

    def unwatch(self) -> None:
        self._spans.clear()
        self._watched = []
        for handle in self._hooks:
            self._set_range(handle, *UNWATCHED)

    def _on_guest_write(self, uc, access: int, address: int, size: int, value: int, _user) -> None:
        cache, m = self.cache, self.m
        running = self._running()
        after = self._continuation(running)
        cache.deferring = True
        try:
            hit = self._invalidate(address, size, "guest-write")
        finally:
            cache.deferring = False
        if not hit:
            return
        if running is not None and not self._in_shadow() and (running in hit or any(unit in hit and address + size > start
                                                          for unit, start in after)):
            # The bare machine restarts a store into the block it is running in, and counts it again
            # (tests/regressions/smc-store-counted-twice.s): count it again too, so that instruction
            # counts, and the timer that ticks on them, stay the bare machine's.
            self.counter.value += 1
        # Stop before the next guest instruction: what runs next may be stale, and Unicorn's copies of the
        # patched cache bytes are dropped at the stop (RESYNC), outside this hook. A pending guest event
        # already set in this chunk gets there the same way; it is not replaced.
        m.stop_chunk(None if m.event_pending else RESYNC, finish=True)

    def _on_host_write(self, physical: int, size: int) -> None:
        pages = self.cache.pages
        if physical >> 12 in pages or (physical + size - 1) >> 12 in pages:
            self._invalidate(physical, size, "host-write")

    def _running(self):
        """The unit whose guest instruction is executing: the one EIP is in, or, for an instruction moved into
        glue at the end of its run (bt_translate), the unit that stands for it."""
        cache, key = self.cache, self.key()
        eip = (self.m.engine.read(X.UC_X86_REG_EIP) + key[1]) & 0xFFFFFFFF
        unit = cache.unit_at(eip)
        if unit is None:
            guest = cache.guest_address(eip)
            at = None if guest is None else cache.index.get((guest, key))
            unit = None if at is None else cache.unit_at(at)
        return unit

    def _in_shadow(self) -> bool:
        """Whether the storing instruction runs in an interrupt shadow (``shadow``): then the bare machine's
        block holds that instruction alone, and a store into the code after it is not into the running block
        (a store into its own bytes would be; none is known to matter)."""
        if self.shadow is None:
            return False
        eip = (self.m.engine.read(X.UC_X86_REG_EIP) + self.key()[1]) & 0xFFFFFFFF
        return self.cache.guest_address(eip) == self.shadow

    def _continuation(self, unit, most: int = 16) -> list:
        """Where straight-line execution goes on after ``unit`` when its run stopped before code translated
        already (``Unit.joins``): [(the translation there now, its first physical byte)]. A store into those
        bytes is a store into the code running now (the bare machine's translation block would hold them)."""
        cache, key, out = self.cache, self.key(), []
        while unit is not None and unit.joins is not None and len(out) < most:
            linear, start = unit.joins
            at = cache.index.get((linear, key))
            unit = None if at is None else cache.unit_at(at)
            if unit is not None:
                out.append((unit, start))
        return out

    def _invalidate(self, address: int, size: int, why: str) -> list:
        """Invalidate the units made from the bytes written; returns them."""
        units = self.cache.units_overlapping(address, address + size)
        for unit in units:
            self.cache.invalidate(unit)
        if units:
            self.counts["invalidation", why] += len(units)
        return units

    def _on_cache_read(self, uc, access: int, address: int, size: int, value: int, _user) -> None:
        """A guest instruction reads the cache: it gets #GP(0) as for any address outside memory; the bytes
        it would read are blanked until the fault is delivered, its register effects are undone."""
        m, cache = self.m, self.cache
        start, end = max(address, cache.base), min(address + size, cache.end)
        if end <= start:
            return
        self.counts["resource", "cache-reads"] += 1
        self._blanked.append((start, cache.read(start, end - start)))
        cache.write(start, bytes(end - start))
        eip = m.engine.read(X.UC_X86_REG_EIP)
        saved = m.registers(GPRS + ("eflags",))
        m.stop_chunk(Interrupt(GP, EXCEPTION, 0, eip=eip, insn=eip, why=f"read of {address:#x} (outside memory)"),
                     saved)
