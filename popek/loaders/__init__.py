"""Loaders: turn a file into executable code regions with their mode, entry points and symbols.

One module per format behind one interface (``load``). Loaders raise the typed errors of popek.errors;
only popek.cli turns them into a one-line message and exit status 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Region:
    """A run of code bytes at a virtual address, decoded in one mode."""

    name: str          # section name for ELF/PE, "raw" or "raw@START" for flat input
    start: int         # virtual address of data[0] (as objdump prints it)
    data: bytes
    mode: int          # 16, 32 or 64

    @property
    def end(self) -> int:
        return self.start + len(self.data)


@dataclass(frozen=True)
class Image:
    path: str
    format: str                       # "raw", "elf32", "elf64", "pe32", "pe32+"
    sha256: str
    regions: tuple[Region, ...]       # executable regions only
    entry_points: tuple[int, ...] = ()
    symbols: dict[int, str] = field(default_factory=dict)   # function symbol address -> name
