"""popek asm: encodings against GNU as, the sample guest, errors, and the dialect's features.

The SYSTEM table is the living record of Keystone 0.9.2's defects on system instructions: each row says
what raw Keystone does with the GNU-as spelling (OK, WRONG bytes, or REJECTS it) and the test asserts
exactly that, so an upgraded Keystone that fixes (or breaks) a row fails here and says which.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import keystone
import pytest

from popek.asm import assemble_file, assemble_text
from popek.asm import table
from popek.asm.encode import EncodeError, encode
from popek.asm.parse import PARSE_ERRORS, ParseError, parse_line
from popek.cli import main
from popek.errors import BadInput, SourceError

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "samples" / "asm" / "hello.s"
BINUTILS = all(shutil.which(tool) for tool in ("as", "ld", "objcopy"))
needs_binutils = pytest.mark.skipif(not BINUTILS, reason="GNU binutils (as, ld, objcopy) not installed")


def gnu_as(source: str, tmp: Path, defsyms: dict[str, int] | None = None, link_at: int | None = None) -> bytes:
    """The bytes GNU as (Intel syntax, --32) makes of ``source``; linked at ``link_at`` if given."""
    src, obj, out = tmp / "gnu.s", tmp / "gnu.o", tmp / "gnu.bin"
    src.write_text(".intel_syntax noprefix\n.code32\n" + source + "\n")
    cmd = ["as", "--32", "-o", str(obj), str(src)]
    for name, value in (defsyms or {}).items():
        cmd += ["--defsym", f"{name}={value}"]
    subprocess.run(cmd, check=True, capture_output=True)
    if link_at is None:
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out)], check=True)
    else:
        subprocess.run(["ld", "-m", "elf_i386", f"-Ttext={link_at:#x}", "--oformat", "binary", "-e", "_start",
                        "-o", str(out), str(obj)], check=True, capture_output=True)
    return out.read_bytes()


def popek_bytes(line: str, address: int = 0) -> bytes:
    return encode(parse_line(line).statement, lambda sym: 0, address, 32).data


# ---- (1) system instructions: popek == GNU as; what raw Keystone does is recorded ----------------------
OK, WRONG, REJECTS = "ok", "wrong", "rejects"

# (popek source, GNU as spelling if different, Keystone 0.9.2 given the GNU spelling)
SYSTEM = [
    ("lgdt [0x100020]", None, WRONG),            # spurious 0x66: loads a 24-bit base
    ("lgdt fword ptr [eax]", None, WRONG),
    ("lidt [eax]", None, WRONG),
    ("lidt fs:[ebx+esi*4+0x10]", None, WRONG),
    ("sgdt [eax]", None, WRONG),
    ("sgdt [bp+si]", None, WRONG),              # Keystone also adds a disp8 of 0 to [bp+si]
    ("sidt [ebx+8]", None, WRONG),
    ("sldt word ptr [eax]", None, OK),
    ("sldt ax", None, OK),
    ("sldt eax", None, OK),
    ("str [eax]", None, OK),
    ("str ax", None, OK),
    ("str eax", None, OK),
    ("smsw word ptr [eax]", None, OK),
    ("smsw ax", None, OK),
    ("smsw eax", None, OK),
    ("lmsw ax", None, OK),
    ("lmsw [eax]", None, OK),
    ("lldt ax", None, OK),
    ("lldt word ptr [eax]", None, OK),
    ("ltr ax", None, OK),
    ("ltr [eax]", None, OK),
    ("verr ax", None, OK),
    ("verw [eax]", None, OK),
    ("lar eax, bx", None, REJECTS),
    ("lar eax, ecx", None, OK),
    ("lsl eax, bx", None, REJECTS),
    ("lsl edx, word ptr [ebx]", None, REJECTS),
    ("lsl eax, ecx", None, OK),
    ("invlpg [eax]", None, OK),
    ("push es", None, WRONG),                    # 0x66: a 2-byte stack slot
    ("push cs", None, WRONG),
    ("push ss", None, WRONG),
    ("push ds", None, WRONG),
    ("push fs", None, OK),
    ("push gs", None, OK),
    ("pop es", None, WRONG),
    ("pop ss", None, WRONG),
    ("pop ds", None, WRONG),
    ("pop fs", None, OK),
    ("pop gs", None, OK),
    ("mov ds, ax", None, WRONG),
    ("mov ss, ax", None, WRONG),
    ("mov es, bx", None, WRONG),
    ("mov ds, eax", None, OK),
    ("mov gs, word ptr [ebx+4]", None, OK),
    ("mov [ebx], ds", None, WRONG),
    ("mov word ptr [ebx], cs", None, WRONG),
    ("mov eax, ds", None, OK),
    ("mov ax, ss", None, OK),
    ("pushf", None, WRONG),                      # bare pushf/popf/iret become the 16-bit forms
    ("pushfd", None, OK),
    ("pushfw", None, REJECTS),
    ("popf", None, WRONG),
    ("popfd", None, OK),
    ("popfw", None, REJECTS),
    ("iret", None, WRONG),
    ("iretd", None, OK),
    ("iretw", None, REJECTS),
    ("retf", None, OK),
    ("retf 8", None, OK),
    ("jmp far 0x08:0x100010", "jmp 0x08:0x100010", REJECTS),
    ("call far 0x08:0x100010", "call 0x08:0x100010", REJECTS),
    ("jmp 0x1b:0x2000", None, REJECTS),
    ("ljmp 0x08:0x100010", None, WRONG),         # 16-bit far jump (66 ea, offset16)
    ("lcall 0x08:0x100010", None, OK),
    ("jmp far [eax]", "jmp fword ptr [eax]", REJECTS),
    ("call far [ebx+4]", "call fword ptr [ebx+4]", REJECTS),
    ("jmp fword ptr [eax]", None, REJECTS),
    ("ljmp [eax]", None, OK),
    ("lcall [eax]", None, OK),
    ("int 0x80", None, OK),
    ("int 0x82", None, OK),
    ("int3", None, OK),
    ("into", None, OK),
    ("hlt", None, OK),
    ("cli", None, OK),
    ("sti", None, OK),
    ("clts", None, OK),
    ("invd", None, OK),
    ("wbinvd", None, OK),
    ("wrmsr", None, OK),
    ("rdtsc", None, OK),
    ("rdmsr", None, OK),
    ("rdpmc", None, OK),
    ("cpuid", None, OK),
    ("in al, dx", None, OK),
    ("in ax, dx", None, OK),
    ("in eax, dx", None, OK),
    ("in al, 0x60", None, OK),
    ("in ax, 0x60", None, OK),
    ("in eax, 0x60", None, OK),
    ("out dx, al", None, OK),
    ("out dx, ax", None, OK),
    ("out dx, eax", None, OK),
    ("out 0xf4, al", None, OK),
    ("out 0x80, ax", None, OK),
    ("out 0x80, eax", None, OK),
    ("insb", None, OK),
    ("insw", None, OK),
    ("insd", None, OK),
    ("outsb", None, OK),
    ("outsw", None, OK),
    ("outsd", None, OK),
    ("rep outsb", None, OK),
    ("movsd", None, REJECTS),                    # taken for the SSE2 movsd
    ("cmpsd", None, OK),
    ("rep movsd", None, REJECTS),
    # Keystone gets these right; popek uses it, and still checks every one with Capstone.
    ("mov eax, cr0", None, OK),
    ("mov cr0, eax", None, OK),
    ("mov cr3, ebx", None, OK),
    ("mov cr4, eax", None, OK),
    ("mov eax, dr7", None, OK),
    ("mov dr7, eax", None, OK),
    ("sysenter", None, OK),
    ("sysexit", None, OK),
    ("rdtscp", None, OK),
    ("ud2", None, OK),
    ("int1", None, OK),
]
_IDS = [row[0] for row in SYSTEM]


def _keystone_status(text: str, expected: bytes) -> str:
    try:
        encoding, _ = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32).asm(text, 0)
    except keystone.KsError:
        return REJECTS
    return OK if bytes(encoding or b"") == expected else WRONG


@pytest.fixture(scope="module")
def gnu_system(tmp_path_factory) -> dict[str, bytes]:
    if not BINUTILS:
        pytest.skip("GNU binutils not installed")
    tmp = tmp_path_factory.mktemp("gnu")
    return {gnu or ours: gnu_as(gnu or ours, tmp) for ours, gnu, _ in SYSTEM}


@needs_binutils
@pytest.mark.parametrize("ours, gnu, keystone_does", SYSTEM, ids=_IDS)
def test_system_instruction_matches_gnu_as(gnu_system, ours, gnu, keystone_does):
    assert popek_bytes(ours).hex(" ") == gnu_system[gnu or ours].hex(" ")


@needs_binutils
@pytest.mark.parametrize("ours, gnu, keystone_does", SYSTEM, ids=_IDS)
def test_keystone_defect_record_is_current(gnu_system, ours, gnu, keystone_does):
    assert _keystone_status(gnu or ours, gnu_system[gnu or ours]) == keystone_does


def test_every_verified_table_row_is_checked_against_gnu_as():
    used = {encode(parse_line(ours).statement, lambda s: 0, 0, 32).row for ours, _, _ in SYSTEM}
    missing = [r for r in table.ROWS if r not in used]
    assert not missing, f"table rows without a GNU as check in SYSTEM: {missing}"


# The 1 of a shift or rotate by one is implied by the opcode (d0/d1): Capstone reports it as an immediate
# of size 0 on a memory operand, which the immediate check read as a field of -8 bits (a traceback).
SHIFT_BY_ONE = ["rcl byte ptr [0x1000], 1", "shl dword ptr [eax], 1", "sar word ptr [ebx + 4], 1",
                "ror eax, 1", "rcr bl, 1"]


@needs_binutils
@pytest.mark.parametrize("text", SHIFT_BY_ONE)
def test_shift_by_one_matches_gnu_as(text, tmp_path):
    assert popek_bytes(text).hex(" ") == gnu_as(text, tmp_path).hex(" ")


def test_int_3_keeps_the_form_that_was_written():
    # GNU as turns `int 3` into int3 (cc); the two differ under virtualization (V86 IOPL check, and
    # the scanner names them differently), so popek keeps CD 03.
    assert popek_bytes("int 3") == b"\xcd\x03"
    assert popek_bytes("int3") == b"\xcc"


def test_table_encodings_are_verified_too(monkeypatch):
    bad = table.Row("pushfd", (), "66 9c", "pushfd")    # as Keystone would have it
    monkeypatch.setitem(table._BY_MNEMONIC, "pushfd", [bad])
    with pytest.raises(EncodeError, match="spurious operand-size prefix 0x66"):
        popek_bytes("pushfd")
    typo = table.Row("lgdt", ("m",), "0f 01 /3", "lgdt")          # lidt's digit
    monkeypatch.setitem(table._BY_MNEMONIC, "lgdt", [typo])
    with pytest.raises(EncodeError, match="decode as 'lidt"):
        popek_bytes("lgdt [eax]")


# ---- (2) the sample guest ------------------------------------------------------------------------------

def gnu_spelling(source: str) -> str:
    """hello.s in GNU as's Intel dialect: `;` starts a comment for popek but separates statements for as."""
    lines = []
    for line in source.splitlines():
        quoted, cut = False, len(line)
        for i, ch in enumerate(line):
            if ch == '"':
                quoted = not quoted
            elif ch == ";" and not quoted:
                cut = i
                break
        line = line[:cut].replace(".dword", ".long").replace("jmp far ", "jmp ")
        lines.append(line)
    return "\n".join(lines)


@needs_binutils
@pytest.mark.parametrize("defines", [{}, {"EXIT_CODE": 3}], ids=["default", "EXIT_CODE=3"])
def test_hello_matches_gnu_as(tmp_path, defines):
    program = assemble_file(HELLO, defines=defines)
    expected = gnu_as(gnu_spelling(HELLO.read_text()), tmp_path, defsyms=defines, link_at=0x100000)
    assert program.origin == 0x100000 and program.entry == program.symbols["_start"] == 0x100000
    assert program.image.hex(" ") == expected.hex(" ")


def test_hello_runs_on_a_bare_cpu():
    """Its GDT, far jump and segment loads really work: Unicorn runs it to the exit port."""
    unicorn = pytest.importorskip("unicorn")
    from unicorn import x86_const as X

    program = assemble_file(HELLO, defines={"EXIT_CODE": 7})
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, 2 << 20)
    uc.mem_write(program.origin, program.image)
    console, exit_code = bytearray(), []

    def out(uc, port, size, value, data):
        if port == 0x3F8:
            console.append(value & 0xFF)
        elif port == 0xF4:
            exit_code.append(value & 0xFF)
            uc.emu_stop()

    uc.hook_add(unicorn.UC_HOOK_INSN, out, None, 1, 0, X.UC_X86_INS_OUT)
    uc.emu_start(program.entry, program.end, count=10_000)
    assert bytes(console) == b"hello\n" and exit_code == [7]
    assert uc.reg_read(X.UC_X86_REG_CS) == 0x08 and uc.reg_read(X.UC_X86_REG_SS) == 0x10


# ---- (3) errors: FILE:LINE[:COL]: message --------------------------------------------------------------

# (files, expected start of str(error), expected fragment). The first file is assembled.
ERRORS = [
    ({"t.s": "nop\nmovx eax, 1\n"}, "t.s:2:1: ", "unknown instruction 'movx': movx eax, 1"),
    ({"t.s": "jmp nowhere\n"}, "t.s:1:5: ", "undefined symbol 'nowhere'"),
    ({"t.s": "nop\n.bytes 1\n"}, "t.s:2:1: ", "unknown directive '.bytes'"),
    ({"t.s": '.include "a.s"\n', "a.s": '.include "b.s"\n', "b.s": 'nop\n.include "a.s"\n'},
     "b.s:2: ", "include loop: a.s -> b.s -> a.s"),
    ({"t.s": '.include "missing.s"\n'}, "t.s:1: ", "cannot find include file 'missing.s'"),
    ({"t.s": "nop\n.if 1\nnop\n"}, "t.s:2: ", "unterminated conditional (no .endif)"),
    ({"t.s": ".ifdef X\n.else\nnop\n"}, "t.s:1: ", "unterminated conditional"),
    ({"t.s": ".macro m a\nnop\n"}, "t.s:1: ", "unterminated .macro 'm' (no .endm)"),
    ({"t.s": "nop\n.endif\n"}, "t.s:2: ", ".endif without .if"),
    ({"t.s": ".else\n"}, "t.s:1: ", ".else without .if"),
    ({"t.s": ".if 1\n.else\n.else\n.endif\n"}, "t.s:3: ", "second .else"),
    ({"t.s": ".endm\n"}, "t.s:1:1: ", ".endm without .macro"),
    ({"t.s": "x: nop\nx: nop\n"}, "t.s:2:1: ", "'x' is already defined at t.s:1"),
    ({"t.s": "eax: nop\n"}, "t.s:1:1: ", "'eax' is a register name"),
    ({"t.s": ".if here\nnop\n.endif\nhere:\n"}, "t.s:1:5: ", "'here' is not defined"),
    ({"t.s": "here: .if here\n.endif\n"}, "t.s:1:11: ", "'here' is a label"),
    # Keystone misencodings with no table entry are refused, never emitted.
    ({"t.s": "lcall 0x08, 0x1000\n"}, "t.s:1:1: ", "refusing a wrong encoding of 'lcall': spurious operand-size"),
    ({"t.s": "mov eax, ds:[ebp]\n"}, "t.s:1:1: ", "refusing a wrong encoding of 'mov': segment override lost"),
    ({"t.s": "mov al, 0x1234\n"}, "t.s:1:1: ", "immediate 0x1234 does not survive encoding"),
    ({"t.s": "mov [eax], 1\n"}, "t.s:1:1: ", "operand size of 'mov' is ambiguous"),
    ({"t.s": "mov eax, [esp*2]\n"}, "t.s:1:", "esp cannot be an index register"),
    ({"t.s": "jmp short far_away\n.space 200\nfar_away:\n"}, "t.s:1:1: ", "too far for a short 'jmp'"),
    ({"t.s": "loop near x\nx:\n"}, "t.s:1:1: ", "'loop' has no near form"),
    ({"t.s": "int 0x100\n"}, "t.s:1:1: ", "immediate 0x100 does not fit in 8 bits"),
    ({"t.s": ".byte 256\n"}, "t.s:1: ", "value 0x100 does not fit in .byte"),
    ({"t.s": ".byte label\nlabel:\n"}, "t.s:1:7: ", "does not fit in .byte"),
    ({"t.s": ".space 4\n.org 0x100000\n"}, "t.s:2:1: ", ".org 0x100000 is behind the current address"),
    ({"t.s": ".macro m a, b\n.endm\nm 1\n"}, "t.s:3:1: ", "macro 'm' needs argument 'b'"),
    ({"t.s": ".macro m\n.endm\nm 1\n"}, "t.s:3:1: ", "macro 'm' takes 0 argument(s), got 1"),
    ({"t.s": ".macro m\nm\n.endm\nm\n"}, "t.s:4: ", "macros nested more than 64 deep"),
    ({"t.s": ".macro m x\nmov eax, \\x\n.endm\nm nothing\n"}, "t.s:4: ",
     "undefined symbol 'nothing' (in macro m, line 1): mov eax, nothing"),
    ({"t.s": "mov eax, [ebx\n"}, "t.s:1:", "missing ']'"),
    ({"t.s": "mov eax, @\n"}, "t.s:1:10: ", "unexpected character '@'"),
    ({"t.s": '.ascii "a\\q"\n'}, "t.s:1: ", "unknown escape \\q"),
    ({"t.s": "push \"abc\"\n"}, "t.s:1:", "a string is not an instruction operand"),
    ({"t.s": ".org 1/0\n"}, "t.s:1", "division by zero"),
    ({"t.s": ".org -1\n"}, "t.s:1:1: ", "outside the 32-bit address space"),
    ({"t.s": "jmp x\n.equ x, x + 1\n"}, "t.s:2: ", "circular definition: x -> x"),
    ({"t.s": ".equ a, b\n.equ b, a\n"}, "t.s:1: ", "circular definition: a -> b -> a"),
    ({"t.s": ".space n\n.equ n, 0x7fffffff\n"}, "t.s:1:1: ", "the image would grow past 256 MiB"),
    ({"t.s": "call short x\nx:\n"}, "t.s:1:1: ", "'call' has no short form"),
]


@pytest.mark.parametrize("files, where, message", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_error_names_file_line_and_problem(tmp_path, monkeypatch, files, where, message):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        Path(name).write_text(text)
    with pytest.raises(SourceError) as info:
        assemble_file(next(iter(files)))
    assert str(info.value).startswith(where), str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("message, snippets", PARSE_ERRORS.items())
def test_parse_error_table(message, snippets):
    for snippet in snippets:
        with pytest.raises(ParseError) as info:
            parse_line(snippet)
        assert info.value.message == message, snippet


def test_missing_source_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="cannot read"):
        assemble_file(tmp_path / "nope.s")


# ---- (4) the dialect ------------------------------------------------------------------------------------

def test_forward_references_settle_short_and_near():
    program = assemble_text("""
    _start: jmp near_target         ; forward, in short range
            jmp far_target          ; forward, beyond 127 bytes: must become rel32
    near_target:
            .space 200, 0x90
    far_target:
            jz _start               ; backward, out of short range
            hlt
    """)
    s = program.symbols
    assert program.image[:2] == bytes([0xEB, s["near_target"] - (s["_start"] + 2)])
    assert program.image[2] == 0xE9 and int.from_bytes(program.image[3:7], "little") == s["far_target"] - (s["_start"] + 7)
    jz = program.image[s["far_target"] - program.origin:][:6]
    assert jz[:2] == b"\x0f\x84" and int.from_bytes(jz[2:], "little", signed=True) == s["_start"] - (s["far_target"] + 6)
    assert program.passes >= 2


def test_forward_equ_and_here():
    program = assemble_text("""
    .equ SIZE, end - begin
    begin: mov ecx, SIZE
           .dword $
    end:
    """)
    assert program.symbols["SIZE"] == 9
    assert program.image == b"\xb9\x09\x00\x00\x00" + (0x100005).to_bytes(4, "little")


def test_sizes_never_shrink_after_grow_only_pass(monkeypatch):
    # Pass 0 guesses SMALL's value from the address (push imm32); pass 1 knows it is 5 (push imm8).
    # In grow-only mode the shorter encoding keeps the earlier size, padded with NOPs.
    source = "push SMALL\nhlt\n.equ SMALL, 5\n"
    assert assemble_text(source).image.hex(" ") == "6a 05 f4"
    monkeypatch.setattr("popek.asm.assemble.GROW_ONLY_AFTER", 1)
    assert assemble_text(source).image.hex(" ") == "6a 05 90 90 90 f4"


def test_near_and_short_keywords():
    program = assemble_text("jmp near next\njz near next\ncall near next\njmp short next\nnext:")
    assert program.image.hex(" ") == "e9 0d 00 00 00 0f 84 07 00 00 00 e8 02 00 00 00 eb 00"


def test_macros_with_unique_local_labels():
    program = assemble_text(r"""
    .macro spin count, reg=ecx
        mov \reg, \count
    loop\@: dec \reg
        jnz loop\@
    .endm
    spin 3
    spin 5, edx
    """)
    locals_ = sorted(name for name in program.symbols if name.startswith("loop"))
    assert len(locals_) == 2 and locals_[0] != locals_[1]
    assert program.image.hex(" ") == "b9 03 00 00 00 49 75 fd ba 05 00 00 00 4a 75 fd"
    assert any(line.macro for line in program.listing)


@pytest.mark.parametrize("defines, expected", [
    (None, b"\x01"), ({"PV": 1}, b"\x02"), ({"SUN4V": None}, b"\x03"), (["PV", "SUN4V=0"], b"\x02"),
    ({"VARIANT": 7}, b"\x07"),
])
def test_conditional_assembly_with_defines(defines, expected):
    source = """
    .ifdef VARIANT
        .byte VARIANT
    .else
    .ifdef PV
        .byte 2              ; paravirtual
    .else
    .ifdef SUN4V
    .if SUN4V == 1
        .byte 3              ; sun4v model
    .endif
    .else
        .byte 1              ; native
    .endif
    .endif
    .endif
    """
    assert assemble_text(source, defines=defines).image == expected


def test_if_expressions_see_equ_and_defines():
    source = ".equ LIMIT, 4\n.if LEVEL * 2 > LIMIT && !(LEVEL == 5)\n.byte 1\n.else\n.byte 0\n.endif\n"
    assert assemble_text(source, defines={"LEVEL": 3}).image == b"\x01"
    assert assemble_text(source, defines={"LEVEL": 5}).image == b"\x00"
    assert assemble_text(source, defines={"LEVEL": 1}).image == b"\x00"


def test_include_is_relative_to_the_including_file(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "serial.inc").write_text('.equ COM1, 0x3F8\n.include "more.inc"\n')
    (tmp_path / "lib" / "more.inc").write_text("putc: out dx, al\nret\n")
    (tmp_path / "main.s").write_text('.include "lib/serial.inc"\nmov dx, COM1\ncall putc\n')
    program = assemble_file(tmp_path / "main.s")
    assert program.symbols["COM1"] == 0x3F8 and program.symbols["putc"] == 0x100000
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.s").write_text('.include "serial.inc"\nnop\n')
    assert assemble_file(tmp_path / "other" / "x.s", include_dirs=[tmp_path / "lib"]).image.endswith(b"\x90")


def test_org_align_space_and_data():
    program = assemble_text(r"""
    .org 0x7c00
    start:  .byte 1, -1, 'A'
            .align 4
            .word 0x1234, -2
            .align 8, 0x90
            .dword start
            .space 3, 0xcc
            .ascii "a\tb", "\x41\101"
            .asciz "z"
            .org 0x7c20
            .byte 0xee
    """)
    assert program.origin == 0x7C00 and program.entry == 0x7C00
    assert program.image.hex(" ") == (
        "01 ff 41 00 34 12 fe ff 00 7c 00 00 cc cc cc 61 09 62 41 41 7a 00 00 00 00 00 00 00 00 00 00 00 ee")


def test_code16_switches_encoder_and_checker():
    program = assemble_text(".code16\nmov ax, 1\nmov eax, 1\npush ds\n.code32\nmov ax, 1\n", origin=0x7C00)
    assert program.image.hex(" ") == "b8 01 00 66 b8 01 00 00 00 1e 66 b8 01 00"


def test_listing_and_symbols():
    program = assemble_text("_start: cli\nmsg: .ascii \"0123456789abcdef0123456789\"\n", name="l.s")
    text = program.listing_text()
    assert "00100000  fa" in text and "cli" in text
    assert "00100001  30 31 32 33 34 35 36 37" in text
    assert text.rstrip().endswith("00100001  msg")
    assert [(ln.line, ln.address, ln.data) for ln in program.listing][0] == (1, 0x100000, b"\xfa")


def test_entry_prefers__start_then_start():
    assert assemble_text("nop\nstart: nop\n").entry == 0x100001
    assert assemble_text("nop\nstart: nop\n_start: nop\n").entry == 0x100002
    assert assemble_text("nop\n").entry == 0x100000


def test_keywords_and_case():
    program = assemble_text("MOV EAX, DWORD PTR [EBX + 4]\nLGDT [0x1000]\nrep movsb\nlock inc dword ptr [eax]\n")
    assert program.image.hex(" ") == "8b 43 04 0f 01 15 00 10 00 00 f3 a4 f0 ff 00"


def test_cli_writes_image_and_listing(tmp_path, capsys):
    src = tmp_path / "g.s"
    src.write_text(HELLO.read_text())
    assert main(["asm", str(src), "-D", "EXIT_CODE=2", "--listing", str(tmp_path / "g.lst")]) == 0
    image = (tmp_path / "g.bin").read_bytes()
    assert image == assemble_file(HELLO, defines={"EXIT_CODE": 2}).image
    assert "wrote" in capsys.readouterr().out
    assert "gdt_descriptor" in (tmp_path / "g.lst").read_text()
    assert main(["asm", str(src), "-o", str(tmp_path / "x.img"), "--listing", "-"]) == 0
    assert "; symbols" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    src = tmp_path / "bad.s"
    src.write_text("nop\nbogus eax\n")
    assert main(["asm", str(src)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{src}:2:1: unknown instruction 'bogus'" in err
    assert main(["asm", str(src), "-D", "9x"]) == 2
