"""popek run: guest files are checked before anything is allocated, the exit status says how the run ended,
and Ctrl-C stops a run within a second with its partial result (issue 8 §3, §4)."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from popek.cli import main

GUESTS = Path(__file__).resolve().parent.parent / "samples" / "guests"


def _elf(memsz: int, segments: int = 1) -> bytes:
    """A minimal ELF32 i386 executable: ``segments`` PT_LOAD headers of 4 file bytes and ``memsz`` in memory."""
    header = b"\x7fELF\x01\x01\x01" + bytes(9) + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, 0x100000, 52, 0, 0, 52,
                                                              32, segments, 0, 0, 0)
    offset = 52 + 32 * segments
    phdrs = b"".join(struct.pack("<IIIIIIII", 1, offset, 0x100000 + i * 0x1000, 0x100000 + i * 0x1000, 4, memsz,
                                 7, 0x1000) for i in range(segments))
    return header + phdrs + b"\xb0\x00\xe6\xf4"          # mov al, 0; out 0xf4, al


@pytest.mark.parametrize("segments", [1, 8])
def test_an_elf_with_a_huge_p_memsz_is_refused_at_once(tmp_path, capsys, segments):
    path = tmp_path / "huge.elf"
    path.write_bytes(_elf(0x7FFFFFFF, segments))
    started = time.perf_counter()
    assert main(["run", str(path)]) == 2
    assert time.perf_counter() - started < 2
    assert "guest RAM" in capsys.readouterr().err


def test_a_small_elf_runs(tmp_path, capsys):
    path = tmp_path / "ok.elf"
    path.write_bytes(_elf(4))
    assert main(["run", str(path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["exit"] == {"reason": "exit-port", "code": 0}


def test_a_fifo_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert main(["run", str(fifo)]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_a_pe_file_is_not_a_guest_image(tmp_path, capsys):
    path = tmp_path / "prog.exe"
    path.write_bytes(b"MZ" + bytes(200))
    assert main(["run", str(path)]) == 2
    assert "not a guest image" in capsys.readouterr().err


def test_a_triple_fault_ends_popek_run_with_status_3(tmp_path, capsys):
    path = tmp_path / "ud.bin"
    path.write_bytes(b"\x0f\x0b")                       # ud2 with no IDT: #UD, #DF, triple fault
    assert main(["run", str(path)]) == 3
    assert "triple-fault" in capsys.readouterr().out


def test_ctrl_c_stops_an_endless_run_within_a_second_with_its_partial_result(tmp_path):
    path = tmp_path / "loop.bin"
    path.write_bytes(b"\xeb\xfe")                       # jmp $
    proc = subprocess.Popen([sys.executable, "-m", "popek.cli", "run", str(path), "--format", "json",
                             "--max-instructions", str(10 ** 12)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)                                     # well inside the run
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert time.perf_counter() - sent < 1.0, err
    assert proc.returncode == 130, err
    doc = json.loads(out)
    assert doc["exit"]["reason"] == "interrupted" and doc["guest_instructions"] > 0
