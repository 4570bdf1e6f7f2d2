"""The translation cache: the memory translated code lives in, the records of what is there, and keeping
them valid (QEMU's tb-maint: link, unlink, invalidate, flush).

**Memory.** One host buffer mapped into the machine's physical space right after monitor memory, so outside
guest RAM (DESIGN §3.3) and, for a guest that pages, inside the same 4 MiB of linear space the monitor's
page table already maps. It is mapped execute-only: a guest store there is a write-protection error (the
machine makes it #GP(0), as for any address outside RAM). Unicorn does not reliably refuse *reads* of an
execute-only page (a data read succeeds once the page has been fetched from: measured), so the monitor
watches reads of the range with a hook (popek.monitors.bt). The monitor writes the buffer directly (a
``uc_mem_write`` to a protected region from inside a hook crashes Unicorn 2.1.4); Unicorn has not seen
fresh bytes, and ``patch`` drops its translation of bytes it may have seen.

Two regions: **units** (translated guest instructions, one counted cache instruction per guest instruction)
and **glue** (exit stubs, call/return/indirect sequences), which the machine's instruction counter does not
count (``Engine.count_only``).

**Records.** A ``Unit`` is the translation of a straight run of guest instructions that stays in one guest
page and ends at a control transfer, a callout or the length cap; a translation run lays several units out
back to back, so a unit may fall through into the next one without a jump. ``index`` maps every translated
guest instruction (guest address, key) to its cache address, so a unit can be entered anywhere an
instruction starts (after an interrupt taken in the middle of one). An ``Exit`` is a direct branch to a
constant guest target, first pointed at its stub (a callout that resolves it); a ``LookupSite`` is the
inline cache of an indirect branch or return (popek.monitors.bt_emit.Lookup). Both are recorded on the unit
they lead to (``incoming``), so that invalidating it unlinks them.

**Linking** (``link``): an exit to the same guest page is chained by patching the branch itself; an exit to
another page is never chained (QEMU's rule: a page's translations are dropped independently of its
neighbours'), its stub instead becomes a one-entry lookup (``jmp`` to the target's translation), reset when
the target is invalidated. Either way the branch costs no callout once resolved.

**Invalidating** a unit (its guest bytes were written): mark it dead, drop its instructions from the index,
unlink what leads into it and what leads out of it, and overwrite each of its instruction starts with
``int3``, so that anything still arriving there (the unit falling through from the one before, an EIP the
CPU stopped at) traps to the monitor, which finds the guest address and translates again. Counted.

**Flushing** (the cache is full, or the guest's address space changed): forget everything and start again
at the beginning of both regions.
"""
from __future__ import annotations

import bisect
import ctypes
from dataclasses import dataclass, field

import unicorn

from popek.monitors import bt_emit as emit

PAGE = 0x1000


@dataclass(eq=False, slots=True)
class Unit:
    key: tuple                              # (virtual CPL, CS base, 32-bit code)
    guest: int                              # first guest byte (linear)
    guest_end: int                          # one past the last guest byte
    cache: int                              # first cache byte
    cache_end: int = 0
    insns: list = field(default_factory=list)      # [(cache address, guest address)] of each instruction
    exits: list = field(default_factory=list)      # Exits it owns
    lookups: list = field(default_factory=list)    # LookupSites it owns
    incoming: list = field(default_factory=list)   # Exits and (LookupSite, guest) pairs that lead into it
    alive: bool = True
    phys: tuple = ()                        # (linear page, physical page) of each page its bytes are in
    spans: tuple = ()                       # physical_spans(), computed when the unit is installed
                                            # already, and straight-line execution goes on in its translation

    @property
    def pages(self) -> range:
        """Linear pages."""
        return range(self.guest // PAGE, (self.guest_end - 1) // PAGE + 1)

    def physical_spans(self):
        """Its guest bytes as physical ranges: stores are seen at physical addresses (Unicorn's memory
        hooks and the machine's host writes both report them)."""
        for lp, pp in self.phys:
            lo, hi = max(self.guest, lp * PAGE), min(self.guest_end, (lp + 1) * PAGE)
            if lo < hi:
                yield pp * PAGE + lo - lp * PAGE, pp * PAGE + hi - lp * PAGE


@dataclass(eq=False, slots=True)
class Exit:
    owner: Unit
    target: int                             # guest address
    slot: int                               # cache address of the branch's rel32 (points at ``stub`` when unlinked)
    stub: int
    linked: Unit | None = None
    chained: bool = False                   # True: the branch itself was patched; False: the stub was


@dataclass(eq=False, slots=True)
class LookupSite:
    owner: Unit
    at: int                                 # cache address of the block
    layout: emit.Lookup
    insn: int                               # guest address of the branch
    filled: list = field(default_factory=list)     # [(guest target, cache target, Unit)]
    victim: int = 0                         # the way replaced next when all are full


@dataclass(eq=False, slots=True)
class Site:
    """What a callout at one cache address stands for."""

    kind: str                               # "emulate", "cpuid", "exit", "lookup", "continue", "unsupported"
    guest: int                              # guest address of the instruction (or branch) it stands for
    next: int                               # guest address after it
    owner: Unit
    recipe: object = None                   # popek.monitors.emulation.Recipe, decoded at translation time
    routine: object = None
    exit: Exit | None = None
    lookup: LookupSite | None = None


class CodeCache:
    """The memory and the records (see the module docstring)."""

    def __init__(self, machine, unit_bytes: int, glue_bytes: int):
        memory = machine.memory
        self.uc = machine.uc
        # One unmapped page between monitor memory and the cache: a guest read that starts in monitor memory
        # and runs past its end faults there as natively, where Unicorn would read the cache's first bytes
        # (it checks the protection of a page-crossing read's first page only).
        self.base = ((memory.monitor_end + PAGE - 1) & ~(PAGE - 1)) + PAGE
        self.units_start, self.units_end = self.base, self.base + unit_bytes
        self.glue_start, self.glue_end = self.units_end, self.units_end + glue_bytes
        self.end = self.glue_end
        self._buffer = ctypes.create_string_buffer(self.end - self.base)
        self._host = ctypes.addressof(self._buffer)
        self.uc.mem_map_ptr(self.base, self.end - self.base, unicorn.UC_PROT_EXEC, self._host)
        self.flushes = 0
        self.bytes_written = 0
        self.deferring = False              # inside a memory hook: see ``drop``
        self.stale: list[tuple[int, int]] = []
        self._reset_records()
        self.unit_next = self.units_start + 16     # the first bytes hold the count-hook bootstrap (bt.attach)
        self.glue_next = self.glue_start

    def _reset_records(self) -> None:
        self.units: list[Unit] = []                 # in cache order
        self._unit_starts: list[int] = []
        self.glue: list[tuple[int, int, int]] = []  # (start, end, guest address of the branch), in order
        self._glue_starts: list[int] = []
        self.index: dict[tuple[int, tuple], int] = {}
        self.guest_of: dict[int, int] = {}          # cache address of an instruction start -> guest address
        self.after_int: dict[int, tuple[int, int]] = {}   # cache EIP after an IDENT int n -> (insn, next)
        self.sites: dict[int, Site] = {}
        self.pages: dict[int, list[Unit]] = {}      # physical page -> units made from bytes in it
        self.extent: dict[int, list[int]] = {}      # physical page -> [first, end) code byte (never shrinks)

    # --- memory ---------------------------------------------------------------------------------------
    def contains(self, address: int) -> bool:
        return self.base <= address < self.end

    def write(self, address: int, data: bytes) -> None:
        """Fresh bytes (never run since the last flush: Unicorn has no translation of them)."""
        assert self.base <= address and address + len(data) <= self.end
        ctypes.memmove(self._host + address - self.base, data, len(data))
        self.bytes_written += len(data)

    def patch(self, address: int, data: bytes) -> None:
        """Bytes Unicorn may have translated: write them and drop its translation."""
        self.write(address, data)
        self.drop(address, address + len(data))

    def drop(self, begin: int, end: int) -> None:
        """Drop Unicorn's translations of [begin, end), now or, inside a memory hook, at ``settle``:
        ``ctl_remove_cache`` looks the page up in Unicorn's TLB and may refill it, under the store that
        is being made (a crash, measured)."""
        if self.deferring:
            self.stale.append((begin, end))
        else:
            self.uc.ctl_remove_cache(begin, end)

    def settle(self) -> None:
        """Apply the drops deferred inside a memory hook (precondition: not inside one)."""
        stale, self.stale = self.stale, []
        for begin, end in stale:
            self.uc.ctl_remove_cache(begin, end)

    def room(self, unit_bytes: int, glue_bytes: int) -> bool:
        return self.unit_next + unit_bytes <= self.units_end and self.glue_next + glue_bytes <= self.glue_end

    def used(self) -> tuple[int, int]:
        return self.unit_next - self.units_start, self.glue_next - self.glue_start

    def read(self, address: int, size: int) -> bytes:
        return ctypes.string_at(self._host + address - self.base, size)

    def flush(self) -> None:
        """Forget every translation (precondition: nothing will run the old code: the caller sets EIP)."""
        for unit in self.units:
            unit.alive = False              # records still held elsewhere (a callout in progress) are stale
        self._reset_records()
        self.unit_next = self.units_start + 16
        self.glue_next = self.glue_start
        self.stale = []
        # All of Unicorn's translations go too, not just those of the cache: Unicorn keeps the host code of
        # invalidated blocks until its code buffer is flushed, so dropping ranges only would let memory
        # grow with every flush (measured: +580 MiB over 1,200 flushes).
        self.uc.ctl_flush_tb()
        self.flushes += 1

    # --- records --------------------------------------------------------------------------------------
    def add_unit(self, unit: Unit) -> None:
        self.units.append(unit)
        self._unit_starts.append(unit.cache)
        for cache, guest in unit.insns:
            self.guest_of[cache] = guest
            self.index[(guest, unit.key)] = cache
        for _lp, pp in unit.phys:
            self.pages.setdefault(pp, []).append(unit)
        unit.spans = tuple(unit.physical_spans())
        for lo, hi in unit.spans:
            extent = self.extent.get(lo >> 12)
            if extent is None:
                self.extent[lo >> 12] = [lo, hi]
            else:
                extent[0], extent[1] = min(lo, extent[0]), max(hi, extent[1])

    def add_glue(self, start: int, end: int, guest: int) -> None:
        self.glue.append((start, end, guest))
        self._glue_starts.append(start)

    def unit_at(self, address: int) -> Unit | None:
        i = bisect.bisect_right(self._unit_starts, address) - 1
        if i >= 0 and address < self.units[i].cache_end:
            return self.units[i]
        return None

    def guest_address(self, address: int) -> int | None:
        """The guest address an EIP in the cache stands for: the instruction that starts there, or, inside
        glue, the guest branch the glue carries out (its fault is that instruction's fault)."""
        guest = self.guest_of.get(address)
        if guest is not None:
            return guest
        if self.glue_start <= address < self.glue_end:
            i = bisect.bisect_right(self._glue_starts, address) - 1
            if i >= 0 and address < self.glue[i][1]:
                return self.glue[i][2]
        return None

    def units_overlapping(self, start: int, end: int) -> list[Unit]:
        """Live units made from bytes in the physical range [start, end)."""
        found = []
        for page in range(start // PAGE, (end - 1) // PAGE + 1):
            extent = self.extent.get(page)
            if extent is None or end <= extent[0] or extent[1] <= start:
                continue                    # data beside the code on this page: the common case
            units = self.pages.get(page)
            if units is None:
                continue
            live = [unit for unit in units if unit.alive]
            if len(live) < len(units):      # drop invalidated units: the work stays bounded by the live ones
                units[:] = live
            for unit in live:
                if unit not in found and any(s < end and start < e for s, e in unit.spans):
                    found.append(unit)
        return found

    def code_ranges(self) -> list[tuple[int, int]]:
        """The physical byte ranges live translations were made from, merged, sorted."""
        spans = sorted({span for units in self.pages.values() for u in units if u.alive for span in u.spans})
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return [(s, e) for s, e in merged]

    # --- linking --------------------------------------------------------------------------------------
    def link(self, exit: Exit, target: Unit, cache: int) -> bool:
        """Point ``exit`` at ``cache`` (in ``target``); True when the branch itself was chained."""
        if exit.linked is not None:
            self.unlink(exit)
        same_page = exit.owner.guest // PAGE == exit.target // PAGE
        if same_page:
            self.patch(exit.slot, emit.rel32(exit.slot + 4, cache))
        else:
            self.patch(exit.stub, emit.jmp(exit.stub, cache))
        exit.linked, exit.chained = target, same_page
        target.incoming.append(exit)
        return same_page

    def unlink(self, exit: Exit) -> None:
        if exit.linked is None:
            return
        if exit.chained:
            self.patch(exit.slot, emit.rel32(exit.slot + 4, exit.stub))
        else:
            self.patch(exit.stub, emit.stub())
        try:
            exit.linked.incoming.remove(exit)
        except ValueError:
            pass
        exit.linked = None

    def fill(self, site: LookupSite, guest: int, target: Unit, cache: int) -> None:
        """Add (guest -> cache) to a lookup block, replacing the oldest way when all are used."""
        if len(site.filled) < site.layout.ways:
            site.filled.append((guest, cache, target))
        else:
            old = site.filled[site.victim]
            self._forget(old[2], site, old[0])
            site.filled[site.victim] = (guest, cache, target)
            site.victim = (site.victim + 1) % site.layout.ways
        target.incoming.append((site, guest))
        self._rewrite(site)

    def _rewrite(self, site: LookupSite) -> None:
        self.patch(site.at, site.layout.code(site.at, [(g, c) for g, c, _u in site.filled]))

    @staticmethod
    def _forget(unit: Unit, site: LookupSite, guest: int) -> None:
        try:
            unit.incoming.remove((site, guest))
        except ValueError:
            pass

    # --- invalidation ---------------------------------------------------------------------------------
    def invalidate(self, unit: Unit) -> None:
        """See the module docstring. Precondition: ``unit.alive``."""
        unit.alive = False
        for cache, guest in unit.insns:
            if self.index.get((guest, unit.key)) == cache:
                del self.index[(guest, unit.key)]
        for _lp, pp in unit.phys:
            units = self.pages.get(pp)
            if units is not None and unit in units:
                units.remove(unit)
                if not units:
                    del self.pages[pp]
        for ref in list(unit.incoming):
            if isinstance(ref, Exit):
                self.unlink(ref)
            else:
                site, guest = ref
                site.filled = [f for f in site.filled if f[2] is not unit]
                site.victim = 0
                if site.owner.alive:
                    self._rewrite(site)
        unit.incoming.clear()
        for exit in unit.exits:
            self.unlink(exit)
        for site in unit.lookups:
            for _guest, _cache, target in site.filled:
                self._forget(target, site, _guest)
            site.filled = []
        for cache, _guest in unit.insns:
            self.write(cache, emit.INT3)
        self.drop(unit.cache, unit.cache_end)
