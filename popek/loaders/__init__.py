"""Loaders: turn a file into executable code regions with their mode, entry points and symbols.

One module per format behind one interface (``load``), like capa's extractor backends: ``elf``, ``pe`` and
``raw`` each expose ``load(data, path, sha256, ...) -> Image``. The format is chosen from the file's content,
never its name. Loaders raise the typed errors of popek.errors with a one-line message that names the
problem but not the path (callers such as ``iter_files`` users already hold the path and prefix it);
only popek.cli turns them into exit status 2.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import stat
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

from popek.errors import BadInput, UnsupportedFormat, UsageError

MODES = (16, 32, 64)


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
    warnings: tuple[str, ...] = ()    # what could not be scanned (a file cut short), one line each
    user_mode: str = ""               # why the headers say this is user-mode code ("" when they do not)


def printable(text: str) -> str:
    """``text`` fit for one line of output: control characters escaped (a lying header can name a section
    "\\r\\n", and library messages quote what they read)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def section_name(raw: bytes, index: int) -> str:
    """A section name as headers give it, printable; an empty name is section<index>."""
    return printable(raw.decode("utf-8", "replace")) or f"section{index}"


# Content sniffing, first match wins. Modules are imported on use so that scanning ELF files never pays
# for importing pefile, and so that the backends can import Region/Image from this package.
_MAGICS = ((b"\x7fELF", "popek.loaders.elf"), (b"MZ", "popek.loaders.pe"))


def load(path: str, *, mode: int | None = None, base: int = 0,
         regions: Iterable[tuple[int, int, int]] | None = None, raw: bool = False) -> Image:
    """Read ``path`` and return its executable regions (see ``load_data``)."""
    return load_data(read_file(path), path, mode=mode, base=base, regions=regions, raw=raw)


def load_data(data: bytes, path: str, *, mode: int | None = None, base: int = 0,
              regions: Iterable[tuple[int, int, int]] | None = None, raw: bool = False) -> Image:
    """The executable regions of a file's content ``data`` (``path`` only names it).

    ELF and PE files carry their own addresses and modes, so ``mode``, ``base`` and ``regions`` apply only to
    raw (flat) input: a file that is neither ELF nor PE, or any file when ``raw`` is true. Raw input needs
    ``mode`` (16, 32 or 64) or ``regions`` ((start, end, mode) triples in address space, end exclusive).
    """
    if not data:
        raise BadInput("empty file")
    digest = hashlib.sha256(data).hexdigest()
    if not raw:
        for magic, module in _MAGICS:
            if data.startswith(magic):
                image = _within_address_space(importlib.import_module(module).load(data, path, digest))
                return replace(image, warnings=tuple(printable(w) for w in image.warnings))
    if mode is None and not regions:
        raise UnsupportedFormat("not ELF or PE; give --mode 16|32|64 to scan it as raw code")
    from popek.loaders import raw as raw_loader
    return raw_loader.load(data, path, digest, mode=mode, base=base,
                           regions=list(regions) if regions else None)


ADDRESS_LIMIT = 1 << 64   # addresses are 64-bit (Capstone's, objdump's bfd_vma, the CPU's linear address)


def _within_address_space(image: Image) -> Image:
    """Headers may put code past the top of the 64-bit address space (a PE32+ ImageBase near 2^64, an ELF
    sh_addr near it): the part past 2^64 has no address, so it is cut off with a warning rather than
    decoded at wrapped addresses."""
    if all(r.end <= ADDRESS_LIMIT for r in image.regions):
        return image
    kept, warnings = [], list(image.warnings)
    for r in image.regions:
        if r.end <= ADDRESS_LIMIT:
            kept.append(r)
            continue
        room = max(0, ADDRESS_LIMIT - r.start)
        warnings.append(f"{r.name} at 0x{r.start:x} (0x{len(r.data):x} bytes) runs past the top of the 64-bit "
                        f"address space: " + (f"scanned its first 0x{room:x} bytes" if room else "not scanned"))
        if room:
            kept.append(replace(r, data=r.data[:room]))
    if not kept:
        raise BadInput("; ".join(warnings[len(image.warnings):]) + "; nothing left to scan")
    return replace(image, regions=tuple(kept), warnings=tuple(warnings),
                   entry_points=tuple(e for e in image.entry_points if e < ADDRESS_LIMIT),
                   symbols={a: n for a, n in image.symbols.items() if a < ADDRESS_LIMIT})


def read_file(path: str, what: str = "") -> bytes:
    """The whole content of a regular file, or BadInput saying why it cannot be had (``what`` names the
    option the path came from, for the message)."""
    where = f"{what} {path}: " if what else ""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            # Opening a FIFO would block until a writer appears; a device may never end.
            raise BadInput(f"{where}not a regular file ({_kind(st.st_mode)})")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BadInput(f"{where}cannot read: {exc.strerror or exc}") from None
    if not data:
        raise BadInput(f"{where}empty file")
    return data


def iter_files(paths: Iterable[str]) -> Iterator[tuple[str, Exception | None]]:
    """Yield ``(file, None)`` for every regular file named or found below a named directory, and
    ``(path, BadInput)`` for anything that cannot be read, so that nothing is skipped silently.

    Directories are walked depth first with entries in sorted order, so the output is deterministic.
    Symbolic links are followed; a directory reached twice (a symlink loop) is reported, not re-walked.
    """
    seen_dirs: set[tuple[int, int]] = set()
    for path in paths:
        yield from _walk(path, seen_dirs)


def _walk(path: str, seen_dirs: set[tuple[int, int]]) -> Iterator[tuple[str, Exception | None]]:
    try:
        st = os.stat(path)  # follows symlinks; a dangling one fails here
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if os.path.islink(path):
            reason += " (dangling symbolic link)"
        yield path, BadInput(f"cannot read: {reason}")
        return
    if stat.S_ISDIR(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            yield path, BadInput("directory already visited (symbolic link loop?)")
            return
        seen_dirs.add(key)
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            yield path, BadInput(f"cannot list directory: {exc.strerror or exc}")
            return
        for name in names:
            yield from _walk(os.path.join(path, name), seen_dirs)
    elif not stat.S_ISREG(st.st_mode):
        yield path, BadInput(f"not a regular file ({_kind(st.st_mode)})")
    else:
        try:
            os.close(os.open(path, os.O_RDONLY))  # permission problems show here, not mid-scan
        except OSError as exc:
            yield path, BadInput(f"cannot read: {exc.strerror or exc}")
            return
        yield path, None


def _kind(st_mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(st_mode):
            return name
    return "special file"


def parse_region_spec(text: str) -> tuple[int, int, int]:
    """Parse ``START:END:MODE`` (START and END as 0x-hex or decimal, END exclusive, MODE 16|32|64)."""
    parts = text.strip().split(":")
    example = "expected START:END:MODE, e.g. 0x7c00:0x7e00:16"
    if len(parts) != 3:
        raise UsageError(f"bad region {text!r}: {example}")
    try:
        start, end, mode = (_parse_int(p) for p in parts)
    except ValueError:
        raise UsageError(f"bad region {text!r}: {example}") from None
    if mode not in MODES:
        raise UsageError(f"bad region {text!r}: mode must be 16, 32 or 64, not {mode}")
    if end <= start:
        raise UsageError(f"bad region {text!r}: END must be greater than START")
    return start, end, mode


def _parse_int(text: str) -> int:
    text = text.strip()
    value = int(text[2:], 16) if text[:2].lower() == "0x" else int(text, 10)
    if value < 0 or text[2:3] in ("-", "+"):   # int() would accept "0x-5" and "-5"
        raise ValueError(text)
    return value
