"""`popek scan` as a user meets it: exit status, formats, strategies, bad input (DESIGN §3.2)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from popek.cli import main
from popek.isa import language
from popek.isa.classify import Classifier

FIXTURES = Path(__file__).parent / "fixtures" / "asm"
needs_as = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")), reason="GNU as/ld not installed")


def scan(capsys, *argv):
    code = main(["scan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def exe32(tmp_path):
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("GNU as/ld not installed")
    obj, exe = tmp_path / "s.o", tmp_path / "system32"
    subprocess.run(["as", "--32", "-o", obj, FIXTURES / "system32.s"], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-o", exe, obj], check=True)
    return exe


def test_every_mnemonic_in_the_description_is_one_capstone_prints():
    assert Classifier(language.bundled(), extended=True).unknown_mnemonics() == []


def test_exit_status_1_and_json_contract(exe32, capsys):
    code, out, err = scan(capsys, str(exe32), "--format", "json")
    assert code == 1 and err == ""
    doc = json.loads(out)
    assert (doc["schema"], doc["tool"]) == (1, "popek")
    (f,) = doc["files"]
    assert set(f) >= {"path", "format", "sha256", "regions", "findings", "counts"}
    assert f["format"] == "elf32" and f["regions"][0]["name"] == ".text"
    first = f["findings"][0]
    assert set(first) >= {"address", "size", "bytes", "text", "name", "class", "region", "why"}
    assert first["name"] == "sgdt" and first["class"] == "sensitive-unprivileged"
    assert first["text"].startswith("sgdt") and first["why"]
    assert f["counts"]["pushf"] == 2 and f["counts"]["push_seg"] == 7


def test_exit_status_0_when_nothing_sensitive(tmp_path, capsys):
    flat = tmp_path / "plain.bin"
    flat.write_bytes(bytes.fromhex("90 89 d8 01 c3 0f 01 d0 c3"))  # nop; mov; add; xgetbv; ret
    code, out, _ = scan(capsys, "--mode", "32", str(flat))
    assert code == 0 and "no sensitive-unprivileged" in out.lower()


def test_extended_adds_the_extended_set(tmp_path, capsys):
    flat = tmp_path / "x.bin"
    flat.write_bytes(bytes.fromhex("cc 0f 34 0f 01 f8 0f 01 c1 90"))  # int3 sysenter swapgs(64) vmcall
    _, out, _ = scan(capsys, "--mode", "64", "--format", "json", str(flat))
    assert json.loads(out)["files"][0]["findings"] == []
    _, out, _ = scan(capsys, "--mode", "64", "--extended", "--format", "json", str(flat))
    names = [f["name"] for f in json.loads(out)["files"][0]["findings"]]
    assert names == ["int3", "sysenter", "swapgs", "vmcall"]


def test_text_sarif_csv_and_reload(exe32, tmp_path, capsys):
    code, text, _ = scan(capsys, str(exe32))
    assert code == 1 and "sensitive-unprivileged" in text and "sgdt" in text
    saved = tmp_path / "scan.json"
    assert main(["scan", str(exe32), "--format", "json", "-o", str(saved)]) == 1
    capsys.readouterr()
    code, sarif, _ = scan(capsys, "--load", str(saved), "--format", "sarif")
    assert code == 1 and json.loads(sarif)["version"] == "2.1.0"
    code, csv_text, _ = scan(capsys, "--load", str(saved), "--format", "csv")
    assert csv_text.splitlines()[0].startswith("file,address")
    assert len(csv_text.splitlines()) == 1 + len(json.loads(saved.read_text())["files"][0]["findings"])


def test_recursive_marks_reachability(tmp_path, capsys):
    if not shutil.which("as"):
        pytest.skip("GNU as not installed")
    src = tmp_path / "r.s"
    src.write_text(""".code32
.globl _start
_start: sidt (%eax)
        jmp 1f
        .byte 0x0f, 0x01, 0x00      # an sgdt that only a linear sweep decodes: data after the jmp
1:      call f
        hlt
f:      pushf
        ret
""")
    subprocess.run(["as", "--32", "-o", tmp_path / "r.o", src], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-e", "_start", "-o", tmp_path / "r", tmp_path / "r.o"], check=True)
    _, out, _ = scan(capsys, "--strategy", "recursive", "--format", "json", str(tmp_path / "r"))
    found = {f["name"]: f["reachable"] for f in json.loads(out)["files"][0]["findings"]}
    assert found == {"sidt": True, "sgdt": False, "hlt": True, "pushf": True}


def test_several_files_and_directories(exe32, tmp_path, capsys):
    d = tmp_path / "tree" / "sub"
    d.mkdir(parents=True)
    shutil.copy(exe32, d / "a")
    shutil.copy(exe32, tmp_path / "tree" / "b")
    _, out, _ = scan(capsys, "--format", "json", str(tmp_path / "tree"))
    paths = [f["path"] for f in json.loads(out)["files"]]
    assert [Path(p).name for p in paths] == ["b", "a"] or [Path(p).name for p in paths] == ["a", "b"]
    assert len(paths) == 2


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _elf_cut(exe: Path, tmp_path: Path, size: int) -> Path:
    cut = tmp_path / "cut"
    cut.write_bytes(exe.read_bytes()[:size])
    return cut


def _arm_elf(exe: Path, tmp_path: Path) -> Path:
    data = bytearray(exe.read_bytes())
    data[18:20] = (40).to_bytes(2, "little")  # e_machine = EM_ARM
    arm = tmp_path / "arm"
    arm.write_bytes(bytes(data))
    return arm


def _pe_lying(tmp_path: Path) -> Path:
    import struct
    dos = bytearray(64)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 64)
    coff = struct.pack("<4sHHIIIHH", b"PE\0\0", 0x14C, 1, 0, 0, 0, 224, 0x102)
    opt = bytearray(224)
    struct.pack_into("<H", opt, 0, 0x10B)
    struct.pack_into("<I", opt, 28, 0x400000)  # ImageBase
    struct.pack_into("<II", opt, 32, 0x1000, 0x200)
    struct.pack_into("<I", opt, 92, 16)
    section = struct.pack("<8sIIIIIIHHI", b".text", 0x1000, 0x1000, 0x100000, 0x9000, 0, 0, 0, 0, 0x60000020)
    pe = tmp_path / "lying.exe"
    pe.write_bytes(bytes(dos) + coff + bytes(opt) + section + b"\0" * 64)
    return pe


@pytest.mark.parametrize("make, fragment", [
    (lambda exe, tmp: _write(tmp / "empty", b""), "empty"),
    (lambda exe, tmp: _elf_cut(exe, tmp, 300), ""),
    (lambda exe, tmp: _arm_elf(exe, tmp), "ARM"),
    (lambda exe, tmp: _pe_lying(tmp), ""),
    (lambda exe, tmp: _write(tmp / "rnd", os.urandom(4096)), "--mode"),
    (lambda exe, tmp: tmp / "missing", ""),
], ids=["empty", "truncated-elf", "arm-elf", "pe-section-outside-file", "random-without-mode", "missing"])
def test_bad_input_is_one_line_and_exit_2(exe32, tmp_path, capsys, make, fragment):
    path = make(exe32, tmp_path)
    code, out, err = scan(capsys, "--format", "json", str(path))
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert fragment in err
    (entry,) = json.loads(out)["files"]
    assert entry["path"] == str(path) and entry["error"]


def test_random_bytes_with_mode_is_a_clean_result(tmp_path, capsys):
    rnd = tmp_path / "rnd"
    rnd.write_bytes(os.urandom(1 << 16))
    for mode in ("16", "32", "64"):
        code, out, err = scan(capsys, "--mode", mode, "--format", "json", str(rnd))
        assert code in (0, 1) and err == ""
        assert json.loads(out)["files"][0]["instructions"] > 10000


def test_directory_with_an_unusable_entry(exe32, tmp_path, capsys):
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(exe32, d / "good")
    (d / "dangling").symlink_to(tmp_path / "nowhere")
    code, out, err = scan(capsys, "--format", "json", str(d))
    assert code == 2 and "dangling" in err and "Traceback" not in err
    files = {Path(f["path"]).name: f for f in json.loads(out)["files"]}
    assert files["good"]["findings"] and files["dangling"]["error"]


@pytest.mark.parametrize("argv, fragment", [
    ([], "give at least one FILE"),
    (["--region", "zz", "x"], "region"),
    (["--model", "nosuch", "x"], "unknown model"),
])
def test_usage_errors(capsys, argv, fragment):
    code, _, err = scan(capsys, *argv)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_argparse_usage_error_is_exit_2(capsys):
    assert main(["scan", "--format", "xml", "x"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def _tiny_sensitive_elf(tmp_path):
    """A 32-bit ELF with one SIDT, built by GNU as and ld."""
    import shutil
    import subprocess
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("GNU binutils (as, ld) not installed")
    src = tmp_path / "s.s"
    src.write_text(".globl _start\n_start: sidt (%esp)\n nop\n nop\n")
    subprocess.run(["as", "--32", "-o", str(tmp_path / "s.o"), str(src)], check=True)
    exe = tmp_path / "s.elf"
    subprocess.run(["ld", "-m", "elf_i386", "-o", str(exe), str(tmp_path / "s.o")], check=True)
    src.unlink()
    (tmp_path / "s.o").unlink()
    return exe


def test_directory_scan_skips_and_lists_non_binaries(tmp_path, capsys):
    root = tmp_path / "dir"
    root.mkdir()
    _tiny_sensitive_elf(root)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "notes.txt").write_text("text\n")
    assert main(["scan", "--format", "json", str(root)]) == 1      # sensitive found; the scripts are no error
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert [Path(p).name for p in doc["skipped"]] == ["notes.txt", "run.sh"]
    assert len(doc["files"]) == 1 and "error" not in doc["files"][0]
    assert "skipped:" in out.err and "run.sh" in out.err
    assert main(["scan", str(root)]) == 1
    assert "skipped 2 file(s) that are not ELF or PE binaries" in capsys.readouterr().out


def test_directory_without_binaries_is_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["scan", str(empty)]) == 2
    assert "nothing to scan" in capsys.readouterr().err
    (empty / "a.txt").write_text("x\n")
    assert main(["scan", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "1 file(s), none of them ELF or PE" in err and err.count("\n") == 1


def test_a_named_text_file_is_still_an_error(tmp_path, capsys):
    f = tmp_path / "a.txt"
    f.write_text("x\n")
    assert main(["scan", str(f)]) == 2


def test_truncated_elf_is_scanned_with_a_warning(tmp_path, capsys):
    exe = _tiny_sensitive_elf(tmp_path)
    data = exe.read_bytes()
    from elftools.elf.elffile import ELFFile
    with open(exe, "rb") as fh:
        shoff = ELFFile(fh)["e_shoff"]
    cut = tmp_path / "cut.elf"
    cut.write_bytes(data[:shoff + 10])                 # the section header table is cut short
    assert main(["scan", "--format", "json", str(cut)]) == 1
    out = capsys.readouterr()
    report = json.loads(out.out)["files"][0]
    assert [f["name"] for f in report["findings"]] == ["sidt"]
    assert "section header table" in report["warnings"][0]
    assert "warning:" in out.err
    assert main(["scan", "--format", "sarif", str(cut)]) == 1
    notes = json.loads(capsys.readouterr().out)["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert notes[0]["level"] == "warning"


# ------------------------------------------------------------------------------ no traceback from any option

def _one_line_error(err: str, fragment: str) -> None:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and fragment in err, err


def test_base_at_the_top_of_the_address_space(tmp_path, capsys):
    flat = tmp_path / "flat.bin"
    flat.write_bytes(bytes.fromhex("0f0108 c3"))        # sidt [eax]; ret
    code, out, err = scan(capsys, "--mode", "64", "--base", "0xffffffffffffffff", str(flat))
    assert code == 2
    _one_line_error(err, "past the top of the 64-bit address space")
    code, out, err = scan(capsys, "--mode", "64", "--base", "0xfffffffffffffffc", "--strategy", "recursive",
                          "--format", "json", str(flat))
    assert code == 1 and json.loads(out)["files"][0]["findings"][0]["address"] == "0xfffffffffffffffc"
    assert main(["scan", "--mode", "64", "--base", "0x10000000000000000", str(flat)]) == 2
    assert "is not an address" in capsys.readouterr().err


@pytest.mark.parametrize("target, fragment", [("missing/out.txt", "does not exist"), (".", "is a directory")])
def test_output_that_cannot_be_written_is_refused_before_scanning(exe32, tmp_path, capsys, target, fragment):
    code, out, err = scan(capsys, "-o", str(tmp_path / target), str(exe32))
    assert code == 2 and out == ""
    _one_line_error(err, fragment)


@pytest.mark.parametrize("fmt", ["text", "csv", "json", "sarif"])
def test_file_names_that_are_not_utf8(exe32, tmp_path, fmt):
    # A name that is not UTF-8 reaches Python as surrogates: text and CSV write its original bytes back,
    # JSON escapes them, SARIF percent-encodes them; to a file (-o, itself not UTF-8) and to standard output alike.
    # A narrow terminal (COLUMNS=40, shorter than the path) must not wrap the name apart.
    odd = os.fsencode(tmp_path) + b"/vm\xffdetect"
    shutil.copy(exe32, odd)
    report = os.fsencode(tmp_path) + b"/report\xfe"
    for argv in (["-o", report], []):
        proc = subprocess.run([*POPEK, "scan", "--format", fmt, *argv, odd], capture_output=True,
                              env={**os.environ, "LC_ALL": "C.UTF-8", "COLUMNS": "40"})
        assert proc.returncode == 1 and b"Traceback" not in proc.stderr, proc.stderr
        written = open(report, "rb").read() if argv else proc.stdout
        # SARIF's URI percent-encodes the original byte.
        assert {"text": odd, "csv": odd, "json": b"vm\\udcffdetect", "sarif": b"vm%FFdetect"}[fmt] in written


POPEK = [str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "popek")] \
    if (Path(__file__).resolve().parent.parent / ".venv" / "bin" / "popek").exists() else ["popek"]


def test_an_ascii_only_stdout(exe32):
    proc = subprocess.run([*POPEK, "scan", str(exe32)], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.decode("ascii").startswith("popek ") and " scan -- strategy linear" in proc.stdout.decode()


def test_load_of_a_fifo_does_not_hang(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = scan(capsys, "--load", str(fifo))
    assert code == 2
    _one_line_error(err, "not a regular file (fifo)")


@pytest.mark.parametrize("extra, fragment", [(["x.bin"], "FILE arguments"), (["--strategy", "recursive"], "--strategy"),
                                             (["--mode", "32", "--extended"], "--mode, --extended")])
def test_load_with_scan_options_is_a_usage_error(exe32, tmp_path, capsys, extra, fragment):
    saved = tmp_path / "saved.json"
    assert main(["scan", "--format", "json", "-o", str(saved), str(exe32)]) == 1
    capsys.readouterr()
    code, _, err = scan(capsys, "--load", str(saved), *extra)
    assert code == 2
    _one_line_error(err, fragment)
    assert scan(capsys, "--load", str(saved), "--format", "csv")[0] == 1


def test_a_bad_file_in_a_batch_is_that_files_error(exe32, tmp_path, capsys, monkeypatch):
    # A cut-short ELF with nothing left, and a file on which scanning itself fails (a bug, simulated): both are
    # their own errors, the good file is still scanned, and the exit status is 2 (bad input), not 1.
    import popek.scanner as scanner
    d = tmp_path / "batch"
    d.mkdir()
    for name in ("a-good", "c-good"):
        shutil.copy(exe32, d / name)
    (d / "b-cut").write_bytes(exe32.read_bytes()[:200])
    real = scanner.scan_image

    def scan_image(image, *args):
        if image.path.endswith("c-good"):
            raise IndexError("simulated bug")
        return real(image, *args)
    monkeypatch.setattr(scanner, "scan_image", scan_image)
    code, out, err = scan(capsys, "--format", "json", str(d))
    assert code == 2 and "Traceback" not in err
    files = {Path(f["path"]).name: f for f in json.loads(out)["files"]}
    assert files["a-good"]["findings"] and files["b-cut"]["error"]
    assert files["c-good"]["error"].startswith("internal error (a bug in popek; please report it with this file): "
                                               "IndexError: simulated bug at test_scan_cli.py:")
    assert len(err.strip().splitlines()) == 2
    with pytest.raises(IndexError):
        main(["--traceback", "scan", str(d)])


def test_json_has_the_verdict_and_sarif_messages_are_sentences(exe32, tmp_path, capsys):
    code, out, _ = scan(capsys, "--format", "json", str(exe32))
    doc = json.loads(out)
    assert doc["verdict"].startswith(f"{sum(1 for f in doc['files'][0]['findings'] if f['class'] == 'sensitive-unprivileged')}"
                                     " sensitive-unprivileged instructions — classic trap-and-emulate cannot")
    saved = tmp_path / "saved.json"
    saved.write_text(out)
    code, out, _ = scan(capsys, "--load", str(saved), "--format", "sarif")
    messages = [r["message"]["text"] for r in json.loads(out)["runs"][0]["results"]]
    assert messages and all(re.fullmatch(r"\S.* at 0x[0-9a-f]+ is an? [a-z-]+ instruction \(\w+\): [A-Za-z].*\.", m)
                            for m in messages), messages[:3]


@pytest.mark.skipif(not shutil.which("i686-w64-mingw32-gcc"), reason="gcc-mingw-w64-i686 not installed")
@pytest.mark.parametrize("asm, holds", [("sidt %0", False), ("pushl %%cs; popl %%eax; movl %%eax, %0", True)])
def test_user_mode_code_gets_the_theorem_3_verdict(tmp_path, capsys, asm, holds):
    # A console program: SIDT is user-sensitive (a process sees the monitor's IDTR); PUSH CS only shows the
    # real CPL, which is 3 natively and under a monitor alike, so Theorem 3's condition holds.
    src = tmp_path / "p.c"
    src.write_text('int main(void) { unsigned char m[6]; __asm__ volatile("' + asm + '" : "=m"(m) : : "eax");'
                   ' return m[5]; }\n')
    exe = tmp_path / "p.exe"
    subprocess.run(["i686-w64-mingw32-gcc", "-O2", "-o", str(exe), str(src)], check=True)
    code, out, _ = scan(capsys, "--format", "json", str(exe))
    doc = json.loads(out)
    assert code == 1 and doc["files"][0]["user_mode"] == "PE subsystem Windows console"
    assert doc["verdict"].startswith("user-mode code (PE subsystem Windows console): ")
    assert ("Theorem 3's condition holds" if holds else "Theorem 3's condition fails") in doc["verdict"]
    assert "classic trap-and-emulate cannot virtualize" not in doc["verdict"]
