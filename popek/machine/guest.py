"""What to put in guest RAM and where to start: flat images, ELF32 executables, assembly sources.

The format comes from the content (ELF magic) or, for sources, the name (``.s``, ``.S``, ``.asm``), which
``popek.asm.assemble_file`` turns into an image with its origin and entry. Everything else is a flat image,
loaded at 0x00100000 (or ``load_address``) and entered at its first byte (or ``entry``). An ELF32 executable
is loaded by its PT_LOAD program headers at their physical addresses (``p_paddr``: paging is off at boot),
the bytes past ``p_filesz`` zeroed, and entered at ``e_entry``. Every byte must land in guest RAM.

Sizes are checked before anything is allocated: only a regular file is read (a FIFO would block, a
device never end), a file larger than guest RAM is refused from its size, and an ELF segment from its
header. A PE/MZ executable (a Windows program, not a bare-machine guest) is refused with a pointer to
``popek scan``, which analyses those.
"""
from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass, field

from popek.errors import BadInput, TruncatedFile, UnsupportedFormat, WrongArch
from popek.machine.memory import RAM_DEFAULT
from popek.tabular import Tabular

LOAD_ADDRESS = 0x00100000
SOURCE_SUFFIXES = (".s", ".S", ".asm")


@dataclass(frozen=True)
class Guest(Tabular):
    name: str
    segments: tuple[tuple[int, bytes], ...]      # (physical address, bytes), zero fill included
    entry: int
    format: str                                  # "flat", "elf32", "asm"
    symbols: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """What was loaded where: the segments (address, size, sha256), the entry, the symbols."""
        import hashlib

        return {"name": self.name, "format": self.format, "entry": f"{self.entry:#010x}",
                "segments": [{"address": f"{a:#010x}", "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                             for a, d in self.segments],
                "symbols": {k: f"{v:#010x}" for k, v in sorted(self.symbols.items(), key=lambda kv: kv[1])}}

    def caption(self) -> str:
        size = sum(len(d) for _, d in self.segments)
        return f"{self.name} ({self.format}): {size:,} bytes in {len(self.segments)} segment(s), entry {self.entry:#010x}"

    def table(self) -> tuple[list[str], list[list]]:
        """The symbols, by address."""
        return ["symbol", "address"], [[k, f"{v:#010x}"] for k, v in sorted(self.symbols.items(), key=lambda kv: kv[1])]

    def check_fits(self, ram_size: int) -> None:
        for address, data in self.segments:
            if address < 0 or address + len(data) > ram_size:
                raise BadInput(f"{self.name}: {len(data)} bytes at {address:#x} do not fit in "
                               f"{ram_size >> 20} MiB of guest RAM")
        if not 0 <= self.entry < ram_size:
            raise BadInput(f"{self.name}: entry point {self.entry:#x} is outside guest RAM")


def load_guest(path: str, load_address: int | None = None, entry: int | None = None,
               ram_size: int = RAM_DEFAULT, defines: dict | None = None, include_dirs=()) -> Guest:
    """Read a guest file. Raises BadInput (or a subclass) with a one-line message on anything unusable.
    ``defines`` and ``include_dirs`` (searched after the source's own folder) apply to assembly sources."""
    name = os.path.basename(path)
    size = _regular_file_size(path)
    if path.endswith(SOURCE_SUFFIXES):
        guest = _from_source(path, name, defines, entry, include_dirs)
    else:
        if size > ram_size:
            raise BadInput(f"{name}: {size} bytes do not fit in {ram_size >> 20} MiB of guest RAM")
        try:
            with open(path, "rb") as f:
                data = f.read(ram_size + 1)
        except OSError as exc:
            raise BadInput(f"{path}: {exc.strerror or exc}") from None
        if not data:
            raise BadInput(f"{name}: empty file")
        if data[:4] == b"\x7fELF":
            guest = _from_elf(data, name, entry, ram_size)
        elif data[:2] == b"MZ":
            raise UnsupportedFormat(f"{name}: a PE/MZ executable, not a guest image (popek run takes a flat "
                                    f"image, an ELF32 executable or an assembly source; popek scan reads PE)")
        else:
            start = LOAD_ADDRESS if load_address is None else load_address
            guest = Guest(name, ((start, data),), start if entry is None else entry, "flat")
    guest.check_fits(ram_size)
    return guest


def _regular_file_size(path: str) -> int:
    """The size of ``path``, which must be a regular file (checked without opening it: a FIFO would block)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise BadInput(f"{path}: {kind}")
    return info.st_size


def _from_source(path: str, name: str, defines: dict | None, entry: int | None, include_dirs=()) -> Guest:
    try:
        from popek.asm import assemble_file
    except ImportError:
        raise BadInput(f"{name}: assembler not available (popek.asm.assemble_file)") from None
    if not os.path.exists(path):
        raise BadInput(f"{path}: no such file")
    program = assemble_file(path, defines=defines, include_dirs=include_dirs)
    if not program.image:
        raise BadInput(f"{name}: the source assembles to nothing")
    return Guest(name, ((program.origin, bytes(program.image)),),
                 program.entry if entry is None else entry, "asm", dict(program.symbols))


def _from_elf(data: bytes, name: str, entry: int | None, ram_size: int) -> Guest:
    from elftools.common.exceptions import ELFError
    from elftools.construct import ConstructError
    from elftools.elf.elffile import ELFFile
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.elfclass != 32:
            raise UnsupportedFormat(f"{name}: ELF{elf.elfclass}: only 32-bit guests run on this machine")
        if elf["e_machine"] != "EM_386":
            raise WrongArch(f"{name}: ELF for {elf['e_machine']}, not i386")
        if elf["e_type"] != "ET_EXEC":
            raise UnsupportedFormat(f"{name}: {elf['e_type']} is not an executable (link it first)")
        segments, total = [], 0
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            offset, filesz, memsz = seg["p_offset"], seg["p_filesz"], seg["p_memsz"]
            if filesz > memsz:
                raise BadInput(f"{name}: a segment's file size exceeds its memory size")
            if offset + filesz > len(data):
                raise TruncatedFile(f"{name}: a segment extends past the end of the file")
            total += memsz
            if seg["p_paddr"] + memsz > ram_size or total > ram_size:      # before the zero fill is allocated
                raise BadInput(f"{name}: a segment of {memsz} bytes at {seg['p_paddr']:#x} does not fit in "
                               f"{ram_size >> 20} MiB of guest RAM")
            segments.append((seg["p_paddr"], data[offset:offset + filesz] + bytes(memsz - filesz)))
        start = elf["e_entry"]
    except ELFError as exc:
        raise TruncatedFile(f"{name}: bad ELF ({exc})") from None
    except (ConstructError, ValueError, KeyError, struct.error) as exc:
        raise BadInput(f"{name}: bad ELF ({exc})") from None
    if not segments:
        raise BadInput(f"{name}: no loadable segment")
    return Guest(name, tuple(segments), start if entry is None else entry, "elf32")
