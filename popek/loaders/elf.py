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
from elftools.common.utils import struct_parse
from elftools.construct.core import ConstructError
from elftools.elf.constants import P_FLAGS, SH_FLAGS
from elftools.elf.descriptions import describe_e_machine
from elftools.elf.elffile import ELFFile

from popek.errors import BadInput, TruncatedFile, WrongArch
from popek.loaders import Image, Region, section_name

# e_machine -> decoding mode. x32 (ELFCLASS32 with EM_X86_64) is 64-bit code with 32-bit pointers, so the
# machine, not the class, decides. EM_IAMCU is the Intel MCU psABI: plain 32-bit x86 code.
MODES = {"EM_386": 32, "EM_IAMCU": 32, "EM_X86_64": 64}

# What pyelftools (and the construct copy inside it) raise on malformed input.
# OverflowError: a seek to an offset past 2^63 that a header gives.
_PARSE_ERRORS = (ELFError, ConstructError, struct.error, ValueError, LookupError, OverflowError)

# Symbol kinds worth naming code with, best first: when several names share an address the best wins.
_KIND_RANK = {"STT_FUNC": 0, "STT_GNU_IFUNC": 0, "STT_NOTYPE": 1}
_BIND_RANK = {"STB_GLOBAL": 0, "STB_WEAK": 1, "STB_LOCAL": 2}


def load(data: bytes, path: str, sha256: str) -> Image:
    """A file cut short is scanned for what is there, as objdump still disassembles it: a section header
    table past the end falls back to the program headers, a section or segment past the end is scanned up
    to the end of the file; each loss is a warning. Only a file with nothing left to scan is an error."""
    elf = _open(data)
    warnings: list[str] = []
    try:
        mode = _mode(elf)
        sections = _check_tables(elf, len(data), warnings)
        if sections:
            regions, exec_ranges = _section_regions(elf, data, mode, warnings)
            try:
                symbols = _symbols(elf, exec_ranges)
            except _PARSE_ERRORS as exc:
                symbols = {}
                warnings.append(f"ELF symbol tables unreadable ({exc}): findings are not named by symbol")
        else:
            regions, symbols = _segment_regions(elf, data, mode, warnings), {}
        entry = elf["e_entry"]
        # A program interpreter (ld.so) means a dynamically linked user program or PIE.
        user = _user_mode(elf)
        entries = (entry,) if entry and elf["e_type"] in ("ET_EXEC", "ET_DYN") else ()
    except _PARSE_ERRORS as exc:
        raise BadInput(f"malformed ELF: {exc}") from None
    if warnings and not regions:
        raise TruncatedFile("; ".join(warnings) + "; nothing left to scan")
    return Image(path=path, format=f"elf{elf.elfclass}", sha256=sha256, regions=regions,
                 entry_points=entries, symbols=symbols, warnings=tuple(warnings), user_mode=user)


def _user_mode(elf: ELFFile) -> str:
    """A program interpreter (ld.so) means a dynamically linked user program or PIE; kernels, firmware and
    static programs have none (a static program is then judged as any code)."""
    try:
        if any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments()):
            return "dynamically linked ELF program, PT_INTERP"
    except _PARSE_ERRORS:
        pass
    return ""


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


def _check_tables(elf: ELFFile, size: int, warnings: list[str]) -> bool:
    """Header tables must lie inside the file; pyelftools would read past the end and fail obscurely.
    True when the section headers are usable; a section header table past the end is a warning when the
    program headers can stand in for it."""
    tables = (("section header", elf["e_shoff"], elf["e_shentsize"], elf.structs.Elf_Shdr.sizeof()),
              ("program header", elf["e_phoff"], elf["e_phentsize"], elf.structs.Elf_Phdr.sizeof()))
    for what, offset, entsize, need in tables:
        if offset and entsize < need:
            raise BadInput(f"ELF {what} entries are {entsize} bytes, expected {need}")
    phnum = elf.num_segments() if elf["e_phoff"] else 0
    if phnum and elf["e_phoff"] + phnum * elf["e_phentsize"] > size:
        raise TruncatedFile(f"ELF program header table ({phnum} entries at offset 0x{elf['e_phoff']:x}) runs "
                            f"past the end of the file ({size} bytes)")
    if elf["e_shoff"] and elf["e_shoff"] + elf.structs.Elf_Shdr.sizeof() > size:
        # Checked before num_sections(), which reads entry 0 when e_shnum is 0 (extended numbering).
        problem = f"ELF section header table at offset 0x{elf['e_shoff']:x} lies past the end of the file ({size} bytes)"
    else:
        count = elf.num_sections()
        if not count or elf["e_shoff"] + count * elf["e_shentsize"] <= size:
            return bool(count)
        problem = (f"ELF section header table ({count} entries at offset 0x{elf['e_shoff']:x}) runs past the "
                   f"end of the file ({size} bytes)")
    if not phnum:
        raise TruncatedFile(problem + ", and there are no program headers to scan by")
    warnings.append(problem + "; scanned the executable segments instead")
    return False


def _within_file(what: str, offset: int, size: int, data: bytes, warnings: list[str]) -> bytes:
    """The bytes of a section or segment, up to the end of the file if it is cut short (with a warning)."""
    if offset + size <= len(data):
        return data[offset:offset + size]
    kept = max(0, len(data) - offset)
    warnings.append(f"{what} (offset 0x{offset:x}, size 0x{size:x}) runs past the end of the file "
                    f"({len(data)} bytes): " + (f"scanned its first 0x{kept:x} bytes" if kept else "not scanned"))
    return data[offset:offset + kept] if kept else b""


def _section_regions(elf: ELFFile, data: bytes, mode: int, warnings: list[str]):
    """Regions of the executable PROGBITS sections, and {section index: (lowest, end) symbol value}.

    The headers are read one by one rather than as pyelftools section objects, which seek to where the
    headers say (a name table or a compression header at offset 2^63 raises OverflowError)."""
    regions, exec_ranges = [], {}
    relocatable = elf["e_type"] == "ET_REL"
    headers = [_section_header(elf, i) for i in range(elf.num_sections())]
    name_of = _section_names(elf, headers, data, warnings)
    for index, header in enumerate(headers):
        offset, size = header["sh_offset"], header["sh_size"]
        if header["sh_type"] == "SHT_PROGBITS" and header["sh_flags"] & SH_FLAGS.SHF_EXECINSTR and size:
            name = name_of(index)
            if header["sh_flags"] & SH_FLAGS.SHF_COMPRESSED:
                # Only debug sections are compressed in practice; decompressing lying headers is not worth it.
                warnings.append(f"ELF section {name} is compressed (SHF_COMPRESSED): not scanned")
                continue
            code = _within_file(f"ELF section {name}", offset, size, data, warnings)
            if code:
                regions.append(Region(name, header["sh_addr"], code, mode))
            # Symbol values in a relocatable object are offsets into their section.
            low = 0 if relocatable else header["sh_addr"]
            exec_ranges[index] = (low, low + size)
    return tuple(regions), exec_ranges


def _section_header(elf: ELFFile, index: int):
    return struct_parse(elf.structs.Elf_Shdr, elf.stream, stream_pos=elf["e_shoff"] + index * elf["e_shentsize"])


def _section_names(elf: ELFFile, headers: list, data: bytes, warnings: list[str]):
    """index -> section name, read from the section name string table when it lies inside the file; a
    section without a readable name is called section<index>, as one unreadable table is a warning."""
    index = elf.get_shstrndx()
    table = headers[index] if 0 < index < len(headers) else None
    if table is None or table["sh_offset"] + table["sh_size"] > len(data):
        where = "missing" if table is None else (f"at offset 0x{table['sh_offset']:x} (size 0x{table['sh_size']:x}) "
                                                 f"lies outside the file")
        warnings.append(f"ELF section name table (section {index}) {where}: sections are named by index")
        return lambda i: f"section{i}"
    start, end = table["sh_offset"], table["sh_offset"] + table["sh_size"]

    def name_of(i: int) -> str:
        at = start + headers[i]["sh_name"]
        stop = data.find(b"\0", at, end) if at < end else -1
        return section_name(data[at:stop] if stop > at else b"", i)
    return name_of


def _segment_regions(elf: ELFFile, data: bytes, mode: int, warnings: list[str]) -> tuple[Region, ...]:
    regions = []
    for index, segment in enumerate(elf.iter_segments()):
        if segment["p_type"] != "PT_LOAD" or not segment["p_flags"] & P_FLAGS.PF_X or not segment["p_filesz"]:
            continue
        offset, size = segment["p_offset"], segment["p_filesz"]
        code = _within_file(f"ELF segment {index}", offset, size, data, warnings)
        if code:
            regions.append(Region(f"segment{index}", segment["p_vaddr"], code, mode))
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
