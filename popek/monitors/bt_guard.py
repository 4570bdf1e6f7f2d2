"""Keeping translations valid against stores, and the translation cache out of the guest's reach (for bt).

**Stores into code.** Guest stores are caught by write hooks over the physical byte ranges translations
were made from (at most MAX_WATCHED hooks: each costs every guest store a range check, measured), host
writes (emulation routines, interrupt frames) by ``Memory.on_write``. The hooks' ranges are rewritten in
place (popek.machine.rangehooks). Physical addresses, because
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

from collections import Counter

import unicorn
from unicorn import x86_const as X

from popek.machine.faults import EXCEPTION, GP, Interrupt
from popek.machine.rangehooks import WRITE, RangeHooks, merge

# Not an event: what the SMC write hook leaves pending to get control back between two chunks.
RESYNC = Interrupt(-1, why="bt: translations invalidated by a guest store")
MAX_WATCHED = 4
WATCH_GAP = 256          # code ranges closer than this share a hook
GPRS = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")


class Guard:
    """The hooks and listeners above, for one machine and one cache."""

    def __init__(self, machine, cache, counts: Counter, key):
        self.m, self.cache, self.counts = machine, cache, counts
        self.key = key                                  # () -> the translation key now: (CPL, CS base, 32-bit)
        self._writes = RangeHooks(machine, WRITE, self._on_guest_write)
        self._spans: dict[int, list[int]] = {}          # physical page -> [first, end) byte of code in it
        self._blanked: list[tuple[int, bytes]] = []
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
        merged = merge(spans.values(), WATCH_GAP, MAX_WATCHED)
        if not self._writes.covers(merged):
            self._writes.cover(merged)

    def unwatch(self) -> None:
        self._spans.clear()
        self._writes.clear()

    def _on_guest_write(self, uc, access: int, address: int, size: int, value: int, _user) -> None:
        cache, m = self.cache, self.m
        cache.deferring = True
        try:
            hit = self._invalidate(address, size, "guest-write")
        finally:
            cache.deferring = False
        if not hit:
            return
        # Stop before the next guest instruction: what runs next may be stale, and Unicorn's copies of the
        # patched cache bytes are dropped at the stop (RESYNC), outside this hook. A pending guest event
        # already set in this chunk gets there the same way; it is not replaced.
        m.stop_chunk(None if m.event_pending else RESYNC, finish=True)

    def _on_host_write(self, physical: int, size: int) -> None:
        pages = self.cache.pages
        if physical >> 12 in pages or (physical + size - 1) >> 12 in pages:
            self._invalidate(physical, size, "host-write")

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
