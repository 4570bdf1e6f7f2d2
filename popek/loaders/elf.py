"""ELF32/ELF64 for x86, through pyelftools.

Code regions are the executable PROGBITS sections at their sh_addr, which is what ``objdump -d`` prints
(0 for every section of a relocatable object). A file without section headers falls back to executable
PT_LOAD segments. pyelftools reads lazily and trusts the headers, so every table and section is checked
against the file length here before its bytes are used.
"""
from __future__ import annotations

import io
import struct

from elftools.common.exceptions import ELFError
from elftools.construct.core import ConstructError
from elftools.elf.constants import P_FLAGS, SH_FLAGS
from elftools.elf.descriptions import describe_e_machine
from elftools.elf.elffile import ELFFile

from popek.errors import BadInput, TruncatedFile, WrongArch
from popek.loaders import Image, Region

# e_machine -> decoding mode. x32 (ELFCLASS32 with EM_X86_64) is 64-bit code with 32-bit pointers, so the
# machine, not the class, decides. EM_IAMCU is the Intel MCU psABI: plain 32-bit x86 code.
MODES = {"EM_386": 32, "EM_IAMCU": 32, "EM_X86_64": 64}

# What pyelftools (and the construct copy inside it) raise on malformed input.
_PARSE_ERRORS = (ELFError, ConstructError, struct.error, ValueError, LookupError)

# Symbol kinds worth naming code with, best first: when several names share an address the best wins.
_KIND_RANK = {"STT_FUNC": 0, "STT_GNU_IFUNC": 0, "STT_NOTYPE": 1}
_BIND_RANK = {"STB_GLOBAL": 0, "STB_WEAK": 1, "STB_LOCAL": 2}


def load(data: bytes, path: str, sha256: str) -> Image:
    elf = _open(data)
    try:
        mode = _mode(elf)
        _check_tables(elf, len(data))
        if elf.num_sections():
            regions, exec_ranges = _section_regions(elf, data, mode)
            symbols = _symbols(elf, exec_ranges)
        else:
            regions, symbols = _segment_regions(elf, data, mode), {}
        entry = elf["e_entry"]
        entries = (entry,) if entry and elf["e_type"] in ("ET_EXEC", "ET_DYN") else ()
    except _PARSE_ERRORS as exc:
        raise BadInput(f"malformed ELF: {exc}") from None
    return Image(path=path, format=f"elf{elf.elfclass}", sha256=sha256, regions=regions,
                 entry_points=entries, symbols=symbols)


def _open(data: bytes) -> ELFFile:
    try:
        return ELFFile(io.BytesIO(data))
    except _PARSE_ERRORS as exc:
        # Peek at EI_CLASS only to tell a cut-short header (52 or 64 bytes) from a garbled one.
        need = {1: 52, 2: 64}.get(data[4] if len(data) > 4 else 0)
        if need and len(data) < need:
            raise TruncatedFile(f"ELF header cut short: file is {len(data)} bytes, header needs {need} bytes") from None
        raise BadInput(f"malformed ELF header: {exc}") from None


def _mode(elf: ELFFile) -> int:
    machine = elf["e_machine"]
    if machine in MODES:
        return MODES[machine]
    if isinstance(machine, int):  # a number pyelftools has no name for
        raise WrongArch(f"ELF for machine {machine}, not x86")
    desc = describe_e_machine(machine)
    what = machine if desc.startswith("<") else f"{desc} ({machine})"
    raise WrongArch(f"ELF for {what}, not x86")


def _check_tables(elf: ELFFile, size: int) -> None:
    """Header tables must lie inside the file; pyelftools would read past the end and fail obscurely."""
    tables = (("section header", elf["e_shoff"], elf["e_shentsize"], elf.structs.Elf_Shdr.sizeof()),
              ("program header", elf["e_phoff"], elf["e_phentsize"], elf.structs.Elf_Phdr.sizeof()))
    for what, offset, entsize, need in tables:
        if offset and entsize < need:
            raise BadInput(f"ELF {what} entries are {entsize} bytes, expected {need}")
    if elf["e_shoff"] and elf["e_shoff"] + elf.structs.Elf_Shdr.sizeof() > size:
        # Checked before num_sections(), which reads entry 0 when e_shnum is 0 (extended numbering).
        raise TruncatedFile(f"ELF section header table at offset 0x{elf['e_shoff']:x} lies past the end "
                            f"of the file ({size} bytes)")
    for what, offset, count, entsize in (
            ("section header", elf["e_shoff"], elf.num_sections(), elf["e_shentsize"]),
            ("program header", elf["e_phoff"], elf.num_segments() if elf["e_phoff"] else 0, elf["e_phentsize"])):
        if count and offset + count * entsize > size:
            raise TruncatedFile(f"ELF {what} table ({count} entries at offset 0x{offset:x}) runs past the "
                                f"end of the file ({size} bytes)")


def _section_regions(elf: ELFFile, data: bytes, mode: int):
    """Regions of the executable PROGBITS sections, and {section index: (lowest, end) symbol value}."""
    regions, exec_ranges = [], {}
    relocatable = elf["e_type"] == "ET_REL"
    for index, section in enumerate(elf.iter_sections()):
        name = section.name or f"section{index}"
        offset, size = section["sh_offset"], section["sh_size"]
        if section["sh_type"] != "SHT_NOBITS" and size and offset + size > len(data):
            raise TruncatedFile(f"ELF section {name} (offset 0x{offset:x}, size 0x{size:x}) lies past the "
                                f"end of the file ({len(data)} bytes)")
        if section["sh_type"] == "SHT_PROGBITS" and section["sh_flags"] & SH_FLAGS.SHF_EXECINSTR and size:
            regions.append(Region(name, section["sh_addr"], data[offset:offset + size], mode))
            # Symbol values in a relocatable object are offsets into their section.
            low = 0 if relocatable else section["sh_addr"]
            exec_ranges[index] = (low, low + size)
    return tuple(regions), exec_ranges


def _segment_regions(elf: ELFFile, data: bytes, mode: int) -> tuple[Region, ...]:
    regions = []
    for index, segment in enumerate(elf.iter_segments()):
        if segment["p_type"] != "PT_LOAD" or not segment["p_flags"] & P_FLAGS.PF_X or not segment["p_filesz"]:
            continue
        offset, size = segment["p_offset"], segment["p_filesz"]
        if offset + size > len(data):
            raise TruncatedFile(f"ELF segment {index} (offset 0x{offset:x}, size 0x{size:x}) lies past the "
                                f"end of the file ({len(data)} bytes)")
        regions.append(Region(f"segment{index}", segment["p_vaddr"], data[offset:offset + size], mode))
    return tuple(regions)


def _symbols(elf: ELFFile, exec_ranges: dict[int, tuple[int, int]]) -> dict[int, str]:
    """Function symbols from .symtab then .dynsym, plus untyped labels that fall inside executable sections
    (hand-written assembly rarely marks its functions with .type). Linker markers such as _edata often
    carry the index of .text with an address just past it, hence the range check."""
    best: dict[int, tuple[tuple[int, int], str]] = {}
    tables = [s for kind in ("SHT_SYMTAB", "SHT_DYNSYM") for s in elf.iter_sections(kind)]
    for table in tables:
        for sym in table.iter_symbols():
            kind, value, shndx = sym["st_info"]["type"], sym["st_value"], sym["st_shndx"]
            if kind not in _KIND_RANK or not sym.name or not isinstance(shndx, int):
                continue  # undefined, absolute and common symbols have a string st_shndx
            in_code = shndx in exec_ranges and exec_ranges[shndx][0] <= value < exec_ranges[shndx][1]
            if kind == "STT_NOTYPE" and not in_code:
                continue
            rank = (_KIND_RANK[kind], _BIND_RANK.get(sym["st_info"]["bind"], 3))
            if value not in best or rank < best[value][0]:
                best[value] = (rank, sym.name)
    return {addr: name for addr, (_, name) in sorted(best.items())}
