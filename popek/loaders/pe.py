"""PE32 and PE32+ for x86, through pefile.

Code regions are the sections marked executable or as containing code, at ImageBase + VirtualAddress.
pefile is lenient: it records lying headers as warnings and carries on (it even stops reading the section
table quietly), so the section table and each section's raw data are checked against the file here; a code
section cut short by the end of the file is scanned up to there, with a warning.
"""
from __future__ import annotations

import gc
import struct

import pefile

from popek.errors import BadInput, TruncatedFile, WrongArch
from popek.loaders import Image, Region, section_name

MODES = {pefile.MACHINE_TYPE["IMAGE_FILE_MACHINE_I386"]: 32, pefile.MACHINE_TYPE["IMAGE_FILE_MACHINE_AMD64"]: 64}
_CODE = pefile.SECTION_CHARACTERISTICS["IMAGE_SCN_MEM_EXECUTE"] | pefile.SECTION_CHARACTERISTICS["IMAGE_SCN_CNT_CODE"]
_EXPORT = pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_EXPORT"]
_SECTION_HEADER_SIZE = 40
# Subsystems whose programs run as user processes (not NATIVE drivers, not EFI or boot applications).
_USER_SUBSYSTEMS = {pefile.SUBSYSTEM_TYPE[f"IMAGE_SUBSYSTEM_{name}"]: f"PE subsystem {label}" for name, label in (
    ("WINDOWS_GUI", "Windows GUI"), ("WINDOWS_CUI", "Windows console"), ("POSIX_CUI", "POSIX console"),
    ("WINDOWS_CE_GUI", "Windows CE GUI"))}
_PARSE_ERRORS = (pefile.PEFormatError, struct.error, ValueError, LookupError, TypeError)


def load(data: bytes, path: str, sha256: str) -> Image:
    try:
        pe = _parse(data)
    except pefile.PEFormatError as exc:
        raise BadInput(f"not a valid PE file: {getattr(exc, 'value', exc)}") from None
    except _PARSE_ERRORS as exc:
        raise BadInput(f"malformed PE file: {exc}") from None
    try:
        mode = _mode(pe)
        base = pe.OPTIONAL_HEADER.ImageBase
        warnings: list[str] = []
        regions = _regions(pe, data, mode, base, warnings)
        symbols = _exports(pe, base)
        entry = pe.OPTIONAL_HEADER.AddressOfEntryPoint
        fmt = "pe32+" if pe.OPTIONAL_HEADER.Magic == pefile.OPTIONAL_HEADER_MAGIC_PE_PLUS else "pe32"
        user = _USER_SUBSYSTEMS.get(pe.OPTIONAL_HEADER.Subsystem, "")
    except _PARSE_ERRORS as exc:
        raise BadInput(f"malformed PE file: {getattr(exc, 'value', exc)}") from None
    # A DLL without an entry routine has AddressOfEntryPoint 0: that is not code at ImageBase.
    if warnings and not regions:
        raise TruncatedFile("; ".join(warnings) + "; nothing left to scan")
    return Image(path=path, format=fmt, sha256=sha256, regions=regions,
                 entry_points=(base + entry,) if entry else (), symbols=symbols, warnings=tuple(warnings),
                 user_mode=user)


def _parse(data: bytes) -> pefile.PE:
    """pefile.PE on the headers and exports only (fast_load). pefile runs a full gc.collect() whenever
    parsing fails (pefile PR #386), 0.1 s in a process holding the classifier: what exists before the call is
    frozen out of that collection, and thawed after."""
    gc.freeze()
    try:
        return pefile.PE(data=data, fast_load=True)
    finally:
        gc.unfreeze()


def _mode(pe: pefile.PE) -> int:
    machine = pe.FILE_HEADER.Machine
    if machine in MODES:
        return MODES[machine]
    name = pefile.MACHINE_TYPE.get(machine)
    if name:
        raise WrongArch(f"PE for {name.removeprefix('IMAGE_FILE_MACHINE_')} ({name}), not x86")
    raise WrongArch(f"PE for machine 0x{machine:04x}, not x86")


def _regions(pe: pefile.PE, data: bytes, mode: int, base: int, warnings: list[str]) -> tuple[Region, ...]:
    count = pe.FILE_HEADER.NumberOfSections
    table = pe.OPTIONAL_HEADER.get_file_offset() + pe.FILE_HEADER.SizeOfOptionalHeader
    if table + count * _SECTION_HEADER_SIZE > len(data):
        # objdump reads the entries that are there; so do we, and say what is missing.
        there = max(0, (len(data) - table) // _SECTION_HEADER_SIZE)
        warnings.append(f"PE section table ({count} entries at offset 0x{table:x}) runs past the end of the file "
                        f"({len(data)} bytes): read the {there} entries inside it")
        count = there
    if len(pe.sections) < count:
        # pefile stopped early (null or unreadable entries, too many errors) and said why in a warning;
        # objdump lists such entries as empty sections. The entries before it are scanned.
        why = next((w for w in pe.get_warnings() if "section" in w.lower()), "unreadable entry")
        warnings.append(f"PE section table: only {len(pe.sections)} of {count} entries readable ({why.rstrip('.')}): "
                        f"scanned the sections of those")
    regions = []
    for index, section in enumerate(pe.sections[:count]):
        name = section_name(section.Name.rstrip(b"\0"), index)
        offset, raw_size = section.PointerToRawData, section.SizeOfRawData
        if not section.Characteristics & _CODE:
            continue
        # The raw data is padded to FileAlignment; VirtualSize, when given, says how much of it is real.
        size = min(raw_size, section.Misc_VirtualSize or raw_size)
        if size and offset + size > len(data):
            # Cut short: scanned up to the end of the file, as objdump does.
            kept = max(0, len(data) - offset)
            warnings.append(f"PE section {name} (offset 0x{offset:x}, size 0x{size:x}) runs past the end of the "
                            f"file ({len(data)} bytes): " + (f"scanned its first 0x{kept:x} bytes" if kept else "not scanned"))
            size = kept
        if size:
            # The raw PointerToRawData, as objdump uses it (Windows would round it down to 512).
            regions.append(Region(name, base + section.VirtualAddress, data[offset:offset + size], mode))
    return tuple(regions)


def _exports(pe: pefile.PE, base: int) -> dict[int, str]:
    pe.parse_data_directories(directories=[_EXPORT])
    directory = getattr(pe, "DIRECTORY_ENTRY_EXPORT", None)
    symbols: dict[int, str] = {}
    for sym in directory.symbols if directory else ():
        if sym.forwarder or not sym.address:
            continue  # a forwarder's address points at a "DLL.name" string, not at code
        name = sym.name.decode("utf-8", "replace") if sym.name else f"ordinal_{sym.ordinal}"
        symbols.setdefault(base + sym.address, name)
    return dict(sorted(symbols.items()))
