"""Loaders against real files: ELF built here with GNU as/ld/gcc (binutils' nm/objcopy/objdump as the oracle),
PE built here by a small struct.pack builder (and by MinGW when it is installed), and bad input of every kind
the design names. Every bad input must end in a typed popek error, never another exception.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import re
import struct
import subprocess

import pytest

from popek.errors import BadInput, PopekError, TruncatedFile, UnsupportedFormat, UsageError, WrongArch
from popek.loaders import Image, iter_files, load, parse_region_spec

# sgdt [eax]; sidt [eax]; ret -- two sensitive-unprivileged instructions the scanner will look for.
CODE32 = bytes.fromhex("0f0100 0f0108 c3")

ASM = """
    .text
    .globl _start
    .type _start, @function
_start:
    sgdt (%{r}ax)
    call .Lhelper      # a local label: no PLT or text relocation, even in a shared object
    ret
    .globl helper
    .type helper, @function
helper:
.Lhelper:
    sidt (%{r}ax)
    ret
plain_label:          # no .type: a NOTYPE symbol inside .text
    nop
    ret
    .data
value: .long 1
"""


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def nm(path) -> dict[str, int]:
    """name -> address, as binutils sees it (the independent oracle)."""
    out = {}
    for line in run("nm", "--defined-only", str(path)).splitlines():
        addr, _, name = line.split()
        out[name] = int(addr, 16)
    return out


def section_bytes(path, name: str, tmp_path) -> bytes:
    out = tmp_path / f"dump{name}"
    run("objcopy", "-O", "binary", f"--only-section={name}", str(path), str(out))
    return out.read_bytes()


def section_vma(path, name: str) -> int:
    for line in run("objdump", "-h", str(path)).splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[1] == name:
            return int(fields[3], 16)
    raise AssertionError(f"{name} not in objdump -h")


def build_elf(tmp_path, bits: int, kind: str = "exec") -> str:
    """Assemble ASM into an executable ("exec"), a relocatable object ("rel"), a shared object ("so")
    or an x32 executable ("x32")."""
    need("as", "ld", "nm", "objcopy", "objdump")
    src = tmp_path / f"t{bits}{kind}.s"
    src.write_text(ASM.format(r="e" if bits == 32 or kind == "x32" else "r"))
    obj = tmp_path / f"t{bits}{kind}.o"
    as_flag = {"x32": "--x32", 32: "--32", 64: "--64"}["x32" if kind == "x32" else bits]
    run("as", as_flag, str(src), "-o", str(obj))
    if kind == "rel":
        return str(obj)
    emulation = {"x32": "elf32_x86_64", 32: "elf_i386", 64: "elf_x86_64"}["x32" if kind == "x32" else bits]
    out = tmp_path / f"t{bits}{kind}"
    run("ld", "-m", emulation, *(["-shared"] if kind == "so" else []), str(obj), "-o", str(out))
    return str(out)


# --------------------------------------------------------------------------------------------------- ELF

@pytest.mark.parametrize("bits", [32, 64])
def test_elf_executable(tmp_path, bits):
    path = build_elf(tmp_path, bits)
    image = load(path)
    syms = nm(path)
    assert image.format == f"elf{bits}"
    assert image.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert [r.name for r in image.regions] == [".text"]      # .data is not code
    text = image.regions[0]
    assert text.mode == bits
    assert text.start == section_vma(path, ".text") == syms["_start"]
    assert text.data == section_bytes(path, ".text", tmp_path)
    assert text.data.startswith(bytes.fromhex("0f0100"))       # sgdt (%eax)/(%rax)
    assert image.entry_points == (syms["_start"],)
    assert image.symbols[syms["_start"]] == "_start"
    assert image.symbols[syms["helper"]] == "helper"
    assert image.symbols[syms["plain_label"]] == "plain_label"  # untyped label inside .text
    assert syms["value"] not in image.symbols                    # data symbol
    # ld's markers (_edata, __bss_start, _end) are untyped and point past .text: not code names.
    assert all(text.start <= a < text.end for a in image.symbols)


def test_elf_relocatable_object_is_section_relative(tmp_path):
    path = build_elf(tmp_path, 32, "rel")
    image = load(path)
    syms = nm(path)
    assert image.format == "elf32"
    (text,) = image.regions
    assert (text.name, text.start, text.mode) == (".text", 0, 32)   # objdump -d prints from 0
    assert text.data == section_bytes(path, ".text", tmp_path)
    assert image.entry_points == ()                                   # a .o has no entry
    assert syms["helper"] > 0
    assert image.symbols == {0: "_start", syms["helper"]: "helper", syms["plain_label"]: "plain_label"}


def test_elf_shared_object_uses_dynsym_too(tmp_path):
    path = build_elf(tmp_path, 64, "so")
    image = load(path)
    dynamic = {}
    for line in run("nm", "-D", "--defined-only", path).splitlines():
        addr, _, name = line.split()
        dynamic[name] = int(addr, 16)
    assert image.format == "elf64"
    text = next(r for r in image.regions if r.name == ".text")
    assert text.start == section_vma(path, ".text")
    assert text.start < dynamic["helper"] < text.end
    assert image.symbols[dynamic["helper"]] == "helper"
    # Strip .symtab: the names must still come from .dynsym.
    stripped = str(tmp_path / "stripped.so")
    run("objcopy", "--strip-all", path, stripped)
    assert load(stripped).symbols[dynamic["helper"]] == "helper"


def test_x32_is_64bit_code_in_an_elf32(tmp_path):
    path = build_elf(tmp_path, 32, "x32")
    image = load(path)
    assert image.format == "elf32"
    assert {r.mode for r in image.regions} == {64}


def test_elf_without_section_headers_falls_back_to_segments(tmp_path):
    path = build_elf(tmp_path, 32)
    text = load(path).regions[0]
    data = bytearray(open(path, "rb").read())
    struct.pack_into("<I", data, 32, 0)            # e_shoff
    struct.pack_into("<HHH", data, 46, 0, 0, 0)    # e_shentsize, e_shnum, e_shstrndx
    patched = tmp_path / "nosections"
    patched.write_bytes(bytes(data))
    image = load(str(patched))
    assert [r.name for r in image.regions] and all(r.name.startswith("segment") for r in image.regions)
    seg = next(r for r in image.regions if r.start <= text.start < r.end)
    assert seg.data[text.start - seg.start:][:len(text.data)] == text.data
    assert image.symbols == {}


# ------------------------------------------------------------------------------------------ bad ELF input

def patched_elf(tmp_path, name, offset, fmt, value) -> str:
    data = bytearray(open(build_elf(tmp_path, 32), "rb").read())
    struct.pack_into(fmt, data, offset, value)
    out = tmp_path / name
    out.write_bytes(bytes(data))
    return str(out)


def test_truncated_elf_is_scanned_for_what_is_there(tmp_path):
    """Cut in half, the section header table is gone: the executable segments are scanned instead, and the
    image says so; cut inside .text, the rest of .text is scanned."""
    full = load(build_elf(tmp_path, 64))
    data = open(build_elf(tmp_path, 64), "rb").read()
    half = tmp_path / "half"
    half.write_bytes(data[: len(data) // 2])
    image = load(str(half))
    assert image.regions and "section header table" in image.warnings[0]
    assert "scanned the executable segments instead" in image.warnings[0]
    text = next(r for r in full.regions if r.name == ".text")
    assert any(r.start <= text.start and text.end <= r.end for r in image.regions)
    assert not full.warnings
    tiny = tmp_path / "tiny"
    tiny.write_bytes(data[:30])
    with pytest.raises(TruncatedFile, match="header cut short"):
        load(str(tiny))


def test_elf_section_header_offset_past_end(tmp_path):
    path = patched_elf(tmp_path, "shoff", 32, "<I", 0x7FFFFFF0)    # e_shoff of ELF32
    image = load(path)
    assert "section header table at offset 0x7ffffff0" in image.warnings[0]
    assert image.regions and all(r.name.startswith("segment") for r in image.regions)


def test_elf_section_cut_short_is_scanned_up_to_the_end(tmp_path):
    path = build_elf(tmp_path, 32)
    from elftools.elf.elffile import ELFFile   # only to find where .text's header sits
    with open(path, "rb") as f:
        elf = ELFFile(f)
        index = elf.get_section_index(".text")
        header_at = elf["e_shoff"] + index * elf["e_shentsize"]
        text_offset = elf.get_section(index)["sh_offset"]
    data = bytearray(open(path, "rb").read())
    struct.pack_into("<I", data, header_at + 20, len(data) - text_offset + 0x1000)   # sh_size
    cut = tmp_path / "cut"
    cut.write_bytes(bytes(data))
    image = load(str(cut))
    text = next(r for r in image.regions if r.name == ".text")
    assert len(text.data) == len(data) - text_offset
    assert re.search(r"section \.text .* runs past the end of the file .*: scanned its first", image.warnings[0])


def test_elf_section_data_past_end(tmp_path):
    path = build_elf(tmp_path, 32)
    from elftools.elf.elffile import ELFFile   # only to find where .text's header sits
    with open(path, "rb") as f:
        elf = ELFFile(f)
        index = elf.get_section_index(".text")
        header_at = elf["e_shoff"] + index * elf["e_shentsize"]
    data = bytearray(open(path, "rb").read())
    struct.pack_into("<I", data, header_at + 16, len(data) + 0x1000)   # sh_offset
    bad = tmp_path / "badtext"
    bad.write_bytes(bytes(data))
    with pytest.raises(TruncatedFile, match=r"section \.text .* past the end"):
        load(str(bad))


@pytest.mark.parametrize("machine, message", [(40, r"ELF for ARM \(EM_ARM\), not x86"),
                                              (183, r"AArch64 \(EM_AARCH64\)"),
                                              (9999, r"ELF for machine 9999, not x86")])
def test_non_x86_elf(tmp_path, machine, message):
    # No ARM assembler is assumed: patch e_machine of a real ELF, which is all the loader looks at.
    path = patched_elf(tmp_path, "arm", 18, "<H", machine)
    with pytest.raises(WrongArch, match=message):
        load(path)


# ----------------------------------------------------------------------------------------------------- PE

def build_pe(*, plus: bool = False, machine: int | None = None, code: bytes = CODE32,
             exports: tuple[str, ...] = ("probe",), text_pointer: int = 0x200, sections: int | None = None) -> bytes:
    """A minimal valid PE: DOS header, PE signature, COFF and optional headers, .text (code) and .rdata
    (export directory, not code). FileAlignment 0x200, SectionAlignment 0x1000, ImageBase 0x400000 or
    0x140000000. ``text_pointer`` and ``sections`` let a test make the headers lie."""
    machine = machine if machine is not None else (0x8664 if plus else 0x14C)
    image_base = 0x140000000 if plus else 0x400000
    opt_size = (112 if plus else 96) + 16 * 8

    # .rdata: export directory at RVA 0x2000, every export pointing into .text.
    n = len(exports)
    eat, names_rva, ords = 0x2000 + 40, 0x2000 + 40 + 4 * n, 0x2000 + 40 + 8 * n
    strings = 0x2000 + 40 + 10 * n
    blob, name_rvas = b"", []
    for name in ("t.dll", *exports):
        name_rvas.append(strings + len(blob))
        blob += name.encode() + b"\0"
    rdata = struct.pack("<IIHHIIIIIII", 0, 0, 0, 0, name_rvas[0], 1, n, n, eat, names_rva, ords)
    rdata += b"".join(struct.pack("<I", 0x1000 + i) for i in range(n))      # export i at .text + i
    rdata += b"".join(struct.pack("<I", rva) for rva in name_rvas[1:])
    rdata += b"".join(struct.pack("<H", i) for i in range(n)) + blob

    coff = struct.pack("<HHIIIHH", machine, sections if sections is not None else 2, 0, 0, 0, opt_size,
                       0x0022 if plus else 0x0102)
    if plus:
        opt = struct.pack("<HBBIIIII", 0x20B, 2, 0, 0x200, 0x200, 0, 0x1000, 0x1000)
        opt += struct.pack("<QII", image_base, 0x1000, 0x200)
        opt += struct.pack("<HHHHHHIIII", 6, 0, 0, 0, 6, 0, 0, 0x3000, 0x200, 0)
        opt += struct.pack("<HHQQQQII", 3, 0, 0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
    else:
        opt = struct.pack("<HBBIIIIII", 0x10B, 2, 0, 0x200, 0x200, 0, 0x1000, 0x1000, 0x2000)
        opt += struct.pack("<III", image_base, 0x1000, 0x200)
        opt += struct.pack("<HHHHHHIIII", 4, 0, 0, 0, 4, 0, 0, 0x3000, 0x200, 0)
        opt += struct.pack("<HHIIIIII", 3, 0, 0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
    opt += struct.pack("<II", 0x2000, len(rdata)) + b"\0" * 15 * 8     # directory 0: exports
    assert len(opt) == opt_size

    def section(name, vsize, rva, raw_size, pointer, flags):
        return struct.pack("<8sIIIIIIHHI", name, vsize, rva, raw_size, pointer, 0, 0, 0, 0, flags)

    headers = b"MZ" + b"\0" * 58 + struct.pack("<I", 0x40) + b"PE\0\0" + coff + opt
    headers += section(b".text", len(code), 0x1000, 0x200, text_pointer, 0x60000020)   # CODE|EXECUTE|READ
    headers += section(b".rdata", len(rdata), 0x2000, 0x200, 0x400, 0x40000040)        # INITIALIZED|READ
    assert len(headers) <= 0x200
    return (headers.ljust(0x200, b"\0") + code.ljust(0x200, b"\xcc") + rdata.ljust(0x200, b"\0"))


@pytest.mark.parametrize("plus", [False, True])
def test_pe_from_builder(tmp_path, plus):
    path = tmp_path / "t.exe"
    path.write_bytes(build_pe(plus=plus, exports=("probe", "other")))
    image = load(str(path))
    base = 0x140000000 if plus else 0x400000
    assert image.format == ("pe32+" if plus else "pe32")
    assert [(r.name, r.start, r.mode) for r in image.regions] == [(".text", base + 0x1000, 64 if plus else 32)]
    assert image.regions[0].data == CODE32             # VirtualSize cuts the 0xcc file padding off
    assert image.entry_points == (base + 0x1000,)
    assert image.symbols == {base + 0x1000: "probe", base + 0x1001: "other"}


def test_pe_builder_agrees_with_objdump(tmp_path):
    """Guard the builder itself: binutils reads it as the PE we meant."""
    need("objdump")
    path = tmp_path / "t.exe"
    path.write_bytes(build_pe())
    out = run("objdump", "-h", str(path))
    if "pei-i386" not in out:
        pytest.skip("this objdump has no PE support")
    assert section_vma(path, ".text") == 0x401000


@pytest.mark.parametrize("compiler, fmt, mode", [("i686-w64-mingw32-gcc", "pe32", 32),
                                                  ("x86_64-w64-mingw32-gcc", "pe32+", 64)])
def test_pe_from_mingw(tmp_path, compiler, fmt, mode):
    need(compiler, "objdump")
    src = tmp_path / "p.c"
    src.write_text("__declspec(dllexport) int add(int a, int b) { return a + b; }\n"
                   "int main(void) { return add(1, 2); }\n")
    exe = tmp_path / "p.exe"
    run(compiler, "-O1", str(src), "-o", str(exe))
    image = load(str(exe))
    assert image.format == fmt and {r.mode for r in image.regions} == {mode}
    text = next(r for r in image.regions if r.name == ".text")
    assert text.start == section_vma(exe, ".text")
    assert "add" in image.symbols.values()
    add = next(a for a, n in image.symbols.items() if n == "add")
    assert text.start <= add < text.end and text.start <= image.entry_points[0] < text.end


def test_pe_section_outside_the_file(tmp_path):
    path = tmp_path / "lying.exe"
    path.write_bytes(build_pe(text_pointer=0x10000))
    with pytest.raises(TruncatedFile, match=r"PE section \.text \(offset 0x10000"):
        load(str(path))


def test_pe_section_table_past_the_end_is_a_warning(tmp_path):
    # 200 entries announced, 30 fit in the file and 2 are real: the real ones are scanned, the loss is said.
    path = tmp_path / "many.exe"
    path.write_bytes(build_pe(sections=200))
    image = load(str(path))
    assert [r.name for r in image.regions] == [".text"] and image.regions[0].data == CODE32
    assert "runs past the end of the file (1536 bytes): read the 30 entries inside it" in image.warnings[0]
    assert "only 2 of 30 entries readable" in image.warnings[1]


def test_pe_section_count_larger_than_the_table(tmp_path):
    # The table fits in the file but entry 3 is null bytes: pefile stops quietly; we say so (objdump lists the
    # null entry as an empty section) and scan the others.
    path = tmp_path / "three.exe"
    path.write_bytes(build_pe(sections=3))
    image = load(str(path))
    assert [r.name for r in image.regions] == [".text"]
    assert image.warnings == ("PE section table: only 2 of 3 entries readable (Invalid section 2. Contents are "
                              "null-bytes): scanned the sections of those",)


def test_pe32_plus_image_base_near_the_top_of_the_address_space(tmp_path):
    # .text at ImageBase + 0x1000 straddles 2^64: what has an address is scanned, the rest is a warning.
    data = bytearray(build_pe(plus=True))
    at = data.index(struct.pack("<Q", 0x140000000))
    data[at:at + 8] = struct.pack("<Q", (1 << 64) - 0x1000 - 4)
    path = tmp_path / "top.exe"
    path.write_bytes(bytes(data))
    image = load(str(path))
    (region,) = image.regions
    assert region.start == (1 << 64) - 4 and region.data == CODE32[:4]
    assert "runs past the top of the 64-bit address space: scanned its first 0x4 bytes" in image.warnings[0]
    data[at:at + 8] = struct.pack("<Q", (1 << 64) - 0x1000)   # all of .text past the top: nothing to scan
    path.write_bytes(bytes(data))
    with pytest.raises(BadInput, match="not scanned; nothing left to scan"):
        load(str(path))


def _elf_field(path, section_name, field, value):
    """Rewrite one section header field of an ELF file in place (via pyelftools' own offsets)."""
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        elf = ELFFile(f)
        index = elf.get_section_index(section_name) if section_name != "shstrtab" else elf.get_shstrndx()
        entry = elf["e_shoff"] + index * elf["e_shentsize"]
        sub = elf.structs.Elf_Shdr.subcons
        offset = sum(c.sizeof() for c in sub[:[c.name for c in sub].index(field)])
        width = next(c for c in sub if c.name == field).sizeof()
    data = bytearray(open(path, "rb").read())
    data[entry + offset:entry + offset + width] = value.to_bytes(width, "little")
    open(path, "wb").write(bytes(data))


def test_elf_name_table_at_offset_2_63_is_a_warning(tmp_path):
    path = build_elf(tmp_path, 64)
    _elf_field(path, "shstrtab", "sh_offset", 1 << 63)
    image = load(path)
    assert [r.name for r in image.regions] == ["section1"]          # .text, named by its index
    assert "ELF section name table (section" in image.warnings[0] and "lies outside the file" in image.warnings[0]


def test_elf_compressed_code_section_is_a_warning(tmp_path):
    from elftools.elf.constants import SH_FLAGS
    path = build_elf(tmp_path, 64)
    _elf_field(path, ".text", "sh_flags", SH_FLAGS.SHF_ALLOC | SH_FLAGS.SHF_EXECINSTR | SH_FLAGS.SHF_COMPRESSED)
    _elf_field(path, "shstrtab", "sh_offset", 1 << 63)     # pyelftools would also seek there for the header
    with pytest.raises(TruncatedFile, match=r"section1 is compressed \(SHF_COMPRESSED\): not scanned"):
        load(path)


def test_elf_code_past_the_top_of_the_address_space(tmp_path):
    path = build_elf(tmp_path, 64)
    _elf_field(path, ".text", "sh_addr", (1 << 64) - 3)
    image = load(path)
    assert image.regions[0].start == (1 << 64) - 3 and len(image.regions[0].data) == 3
    assert "past the top of the 64-bit address space: scanned its first 0x3 bytes" in image.warnings[0]


def test_pe_for_arm(tmp_path):
    path = tmp_path / "arm.exe"
    path.write_bytes(build_pe(machine=0x1C4))
    with pytest.raises(WrongArch, match=r"PE for ARMNT \(IMAGE_FILE_MACHINE_ARMNT\), not x86"):
        load(str(path))


def test_mz_without_pe_header(tmp_path):
    path = tmp_path / "dos.exe"
    path.write_bytes(b"MZ" + b"\x90" * 200)
    with pytest.raises(BadInput, match="not a valid PE file"):
        load(str(path))


# ---------------------------------------------------------------------------------------------------- raw

def test_raw_needs_a_mode(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(random.Random(7).randbytes(256).replace(b"MZ", b"mz").replace(b"\x7fELF", b"xELF"))
    with pytest.raises(UnsupportedFormat, match=r"not ELF or PE; give --mode 16\|32\|64"):
        load(str(path))


def test_raw_with_mode_and_base(tmp_path):
    path = tmp_path / "flat.bin"
    path.write_bytes(CODE32)
    image = load(str(path), mode=32, base=0x100000)
    assert image.format == "raw"
    assert image.regions == load(str(path), mode=32, base=0x100000).regions
    (region,) = image.regions
    assert (region.name, region.start, region.end, region.mode, region.data) == (
        "raw", 0x100000, 0x100000 + len(CODE32), 32, CODE32)
    assert image.entry_points == (0x100000,)


def test_raw_base_puts_the_last_byte_at_most_at_the_top(tmp_path):
    path = tmp_path / "flat.bin"
    path.write_bytes(CODE32)
    assert load(str(path), mode=64, base=(1 << 64) - len(CODE32)).regions[0].end == 1 << 64
    with pytest.raises(BadInput, match="past the top of the 64-bit address space"):
        load(str(path), mode=64, base=(1 << 64) - 1)


def test_raw_region_specs(tmp_path):
    path = tmp_path / "boot.bin"
    data = bytes(range(256)) * 2
    path.write_bytes(data)
    specs = [parse_region_spec("0x7d00:0x7e00:32"), parse_region_spec("31744:0x7c10:16")]   # 31744 = 0x7c00
    image = load(str(path), base=0x7C00, regions=specs)
    assert [(r.name, r.start, r.end, r.mode) for r in image.regions] == [
        ("raw@0x7c00", 0x7C00, 0x7C10, 16), ("raw@0x7d00", 0x7D00, 0x7E00, 32)]
    assert image.regions[0].data == data[:0x10] and image.regions[1].data == data[0x100:0x200]
    with pytest.raises(BadInput, match="outside the file"):
        load(str(path), base=0x7C00, regions=[(0x7D00, 0x7E01, 32)])
    with pytest.raises(BadInput, match="outside the file"):
        load(str(path), base=0x7C00, regions=[(0x7B00, 0x7C10, 16)])
    with pytest.raises(UsageError, match="overlap"):
        load(str(path), base=0x7C00, regions=[(0x7C00, 0x7C20, 16), (0x7C10, 0x7C30, 32)])


def test_raw_forced_on_an_elf(tmp_path):
    path = build_elf(tmp_path, 32)
    image = load(path, raw=True, mode=16)
    assert image.format == "raw" and image.regions[0].data == open(path, "rb").read()


@pytest.mark.parametrize("text, expected", [("0x7c00:0x7e00:16", (0x7C00, 0x7E00, 16)),
                                            ("0:512:32", (0, 512, 32)), (" 0X10:0x20:64 ", (16, 32, 64))])
def test_parse_region_spec(text, expected):
    assert parse_region_spec(text) == expected


@pytest.mark.parametrize("text", ["", "0x10:0x20", "0x10:0x20:8", "0x20:0x10:16", "0x10:0x10:16",
                                  "a:b:16", "-1:5:16", "0x-1:5:16", "1:2:3:4"])
def test_parse_region_spec_rejects(text):
    with pytest.raises(UsageError, match="bad region"):
        parse_region_spec(text)


# ------------------------------------------------------------------------------------ files and directories

def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match="^empty file$"):
        load(str(empty))
    with pytest.raises(BadInput, match="cannot read: No such file"):
        load(str(tmp_path / "missing"))
    with pytest.raises(BadInput, match=r"not a regular file \(directory\)"):
        load(str(tmp_path))


def test_iter_files_walks_sorted_and_reports_unreadable(tmp_path):
    # Tests run as root, for whom chmod 000 blocks nothing, so the unreadable entries are a dangling
    # symbolic link and a FIFO (which must be refused without opening it: open() would block).
    root = tmp_path / "tree"
    (root / "b_dir" / "deeper").mkdir(parents=True)
    for rel in ("c.bin", "a.bin", "b_dir/z.bin", "b_dir/deeper/x.bin"):
        (root / rel).write_bytes(b"\x90")
    (root / "b_dir" / "dangling").symlink_to(root / "nowhere")
    os.mkfifo(root / "fifo")
    (root / "loop").symlink_to(root)            # must not walk forever
    result = list(iter_files([str(root), str(tmp_path / "missing")]))
    rel = [(os.path.relpath(p, tmp_path), type(e).__name__ if e else None) for p, e in result]
    assert rel == [
        ("tree/a.bin", None),
        ("tree/b_dir/dangling", "BadInput"),
        ("tree/b_dir/deeper/x.bin", None),
        ("tree/b_dir/z.bin", None),
        ("tree/c.bin", None),
        ("tree/fifo", "BadInput"),
        ("tree/loop", "BadInput"),
        ("missing", "BadInput"),
    ]
    errors = {os.path.basename(p): str(e) for p, e in result if e}
    assert "dangling symbolic link" in errors["dangling"]
    assert errors["fifo"] == "not a regular file (fifo)"
    assert "already visited" in errors["loop"]
    with pytest.raises(BadInput, match=r"not a regular file \(fifo\)"):
        load(str(root / "fifo"))


def test_iter_files_single_file(tmp_path):
    f = tmp_path / "one"
    f.write_bytes(b"x")
    assert list(iter_files([str(f)])) == [(str(f), None)]


# -------------------------------------------------------------------------------------- no traceback, ever

def test_mutated_files_only_raise_popek_errors(tmp_path):
    """Cut and corrupt a real ELF and a PE many ways: the loader returns an Image or raises a PopekError."""
    seeds = [open(build_elf(tmp_path, 32), "rb").read(), open(build_elf(tmp_path, 64, "so"), "rb").read(),
             build_pe(), build_pe(plus=True)]
    rng = random.Random(1974)
    path = tmp_path / "mutant"
    outcomes = set()
    for seed in seeds:
        for _ in range(150):
            data = bytearray(seed)
            if rng.random() < 0.3:
                data = data[:rng.randrange(1, len(data))]
            else:
                for _ in range(rng.randrange(1, 6)):
                    # Headers live at both ends of an ELF (section headers last), so hit both.
                    pos = rng.randrange(min(len(data), 512)) if rng.random() < 0.5 else \
                        rng.randrange(max(0, len(data) - 1024), len(data))
                    data[pos] = rng.randrange(256)
            path.write_bytes(bytes(data))
            try:
                assert isinstance(load(str(path)), Image)
                outcomes.add("Image")
            except PopekError as exc:
                assert str(exc) and "\n" not in str(exc)
                outcomes.add(type(exc).__name__)
    assert {"Image", "TruncatedFile"} <= outcomes
