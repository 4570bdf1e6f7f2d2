"""Unicorn hooks whose address ranges follow what a monitor or the machine watches.

A hook is made once and its range rewritten in place in Unicorn's hook record (the offset is calibrated by
``popek.machine.engine``), never deleted: a deleted hook stays in Unicorn's list, and is checked on every
access, until the ``emu_start`` it was deleted in returns (measured: 171 rebuilds made every store 10x
slower). Unicorn checks a memory hook's range on every access, so a rewritten range takes effect at once;
a block or code hook's range only when it translates a block (a block translated inside the old range keeps
calling the hook: drop it from Unicorn's cache).
"""
from __future__ import annotations

import ctypes
from typing import Callable

import unicorn

UNWATCHED = (0xFFFFFFFF, 0xFFFFFFFF)    # a range that no access reaches (beyond RAM and the cache)


def merge(spans, gap: int, most: int) -> list[tuple[int, int]]:
    """``spans`` ([start, end) pairs) as at most ``most`` [start, end) ranges: spans closer than ``gap``
    share one, and beyond ``most`` the ranges are joined across the narrowest gaps (a joined range covers
    more than was asked, never less)."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start - merged[-1][1] <= gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if len(merged) > most:                  # keep the most - 1 widest gaps between ranges
        gaps = sorted(range(1, len(merged)), key=lambda j: merged[j][0] - merged[j - 1][1])
        cuts = sorted(gaps[len(merged) - most:])
        merged = [[merged[a][0], merged[b - 1][1]] for a, b in zip([0] + cuts, cuts + [len(merged)])]
    return [(start, end) for start, end in merged]


class RangeHooks:
    """Hooks of one ``kind`` and ``callback`` over a list of [start, end) ranges (``cover``)."""

    def __init__(self, machine, kind: int, callback: Callable):
        self.m, self.kind, self.callback = machine, kind, callback
        self.handles: list[int] = []
        self.ranges: list[tuple[int, int]] = []

    def covers(self, ranges) -> bool:
        return all(any(h0 <= s and e <= h1 for h0, h1 in self.ranges) for s, e in ranges)

    def cover(self, ranges: list[tuple[int, int]]) -> None:
        """Exactly ``ranges`` ([start, end), end > start): hooks are added as needed, the rest unwatched."""
        for i, (start, end) in enumerate(ranges):
            if i < len(self.handles):
                self._set_range(self.handles[i], start, end - 1)
            else:
                self.handles.append(self.m.uc.hook_add(self.kind, self.callback, None, start, end - 1))
        for handle in self.handles[len(ranges):]:
            self._set_range(handle, *UNWATCHED)
        self.ranges = list(ranges)

    def clear(self) -> None:
        self.cover([])

    def _set_range(self, handle: int, begin: int, end: int) -> None:
        at = handle + self.m.engine.layout.hook_range
        ctypes.c_uint64.from_address(at).value = begin
        ctypes.c_uint64.from_address(at + 8).value = end


WRITE, BLOCK = unicorn.UC_HOOK_MEM_WRITE, unicorn.UC_HOOK_BLOCK
