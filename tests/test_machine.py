"""The bare machine and the native monitor, on real Unicorn, with guests built by GNU as (AT&T syntax).

Guests come from samples/guests/ (see its README) or are written inline below; ``pm.inc`` there provides the
GDT/TSS/IDT scaffolding and the selectors 0x08/0x10 (ring 0) and 0x1b/0x23 (ring 3).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from popek.cli import main
from popek.machine import Machine, RunResult, load_guest
from popek.machine.memory import MIB
from popek.monitors import MONITORS, get_monitor, run_guest
from popek.monitors.base import MonitorOps, run

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "samples" / "guests"

pytestmark = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld") and shutil.which("objcopy")),
                                reason="GNU binutils (as, ld, objcopy) needed to build test guests")


class Built:
    def __init__(self, flat: Path, elf: Path):
        self.flat, self.elf = flat, elf
        out = subprocess.run(["nm", str(elf)], check=True, capture_output=True, text=True).stdout
        self.symbols = {name: int(addr, 16) for addr, _kind, name in
                        (line.split() for line in out.splitlines() if len(line.split()) == 3)}


def build(tmp_path: Path, source: str | Path, name: str = "guest") -> Built:
    """Assemble and link a guest at 0x100000; returns the flat image, the ELF and its symbols."""
    if isinstance(source, Path):
        src = source
    else:
        src = tmp_path / f"{name}.s"
        src.write_text(".code32\n.include \"pm.inc\"\n.globl _start\n_start:\n" + source)
    obj, elf, flat = (tmp_path / f"{name}{ext}" for ext in (".o", ".elf", ".bin"))
    subprocess.run(["as", "--32", "-I", str(GUESTS), "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x100000", "-e", "_start", "-o", str(elf), str(obj)],
                   check=True)
    subprocess.run(["objcopy", "-O", "binary", str(elf), str(flat)], check=True)
    return Built(flat, elf)


def run_path(path: Path, **kw) -> RunResult:
    return run_guest(str(path), **kw)


# --- boot state, console, ends ----------------------------------------------------------------------------
def test_boot_state_is_the_documented_one(tmp_path):
    g = build(tmp_path, "hlt\n")
    r = run_path(g.flat)
    s = r.state
    assert (r.exit.reason, r.guest_instructions) == ("hlt", 1)
    assert s["eip"] == 0x100001 and s["esp"] == 0x90000 and s["eflags"] == 0x2 and s["cpl"] == 0
    assert s["cs"] == 0x08 and all(s[seg] == 0x10 for seg in ("ds", "es", "fs", "gs", "ss"))
    assert s["cr0"] == 0x11 and s["cr2"] == s["cr3"] == s["cr4"] == 0
    assert s["gdtr"] == {"base": 32 * MIB, "limit": 23}          # in monitor memory, above guest RAM
    assert s["idtr"] == {"base": 0, "limit": 0} and s["ldtr"] == s["tr"] == 0
    assert all(s[r] == 0 for r in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp"))


def test_boot_gdt_is_monitor_memory_and_read_only(tmp_path):
    # The guest reads its GDTR, reloads segments from it (the CPU reads it), then tries to write into it.
    g = build(tmp_path, """
  sgdtl gdt_pointer
  mov gdt_pointer+2, %ebx
  mov $0x10, %ax
  mov %ax, %ds
  ljmp $0x08, $1f
1:
  mov 8(%ebx), %ecx
  movl $0, 8(%ebx)
  hlt
gdt_pointer: .word 0
  .long 0
""")
    m = Machine()
    m.load(load_guest(str(g.flat)))
    before = bytes(m.uc.mem_read(32 * MIB, 24))
    r = run(m, get_monitor("native"))
    assert r.exit.reason == "triple-fault"                        # #GP(0), no IDT
    assert r.state["ebx"] == 32 * MIB and r.state["ecx"] == 0x0000FFFF
    assert bytes(m.uc.mem_read(32 * MIB, 24)) == before
    assert r.events["exception"]["#GP"] == 1


def test_console_and_exit_port():
    r = run_guest(str(build_sample("hello")))
    assert r.console == "hello, world\n"
    assert (r.exit.reason, r.exit.code) == ("exit-port", 0)
    assert r.events["io"]["com1"] > 13                             # 13 bytes plus LSR polls


def test_exit_code_is_the_byte_written(tmp_path):
    r = run_path(build(tmp_path, "mov $0x12345678, %eax\nout %al, $0xf4\n").flat)
    assert (r.exit.reason, r.exit.code, r.guest_instructions) == ("exit-port", 0x78, 2)


def test_hlt_with_interrupts_disabled_ends_the_run(tmp_path):
    r = run_path(build(tmp_path, "nop\nnop\nhlt\nnop\n").flat)
    assert (r.exit.reason, r.exit.code, r.guest_instructions) == ("hlt", None, 3)


def test_hlt_with_interrupts_enabled_and_nothing_armed_ends_the_run(tmp_path):
    r = run_path(build(tmp_path, "sti\nhlt\n").flat)
    assert r.exit.reason == "hlt" and r.state["eflags"] & 0x200


def test_budget_ends_an_infinite_loop_exactly(tmp_path):
    r = run_path(build(tmp_path, "1: inc %eax\njmp 1b\n").flat, max_instructions=100_001)
    assert (r.exit.reason, r.guest_instructions) == ("budget", 100_001)
    assert r.state["eax"] == 50_001


def test_instruction_count_is_exact(tmp_path):
    r = run_path(build(tmp_path, "mov $1000, %ecx\n1: loop 1b\nhlt\n").flat)
    assert r.guest_instructions == 1 + 1000 + 1


def test_elf_guest_is_loaded_by_program_headers(tmp_path):
    g = build(tmp_path, "mov value, %eax\nout %al, $0xf4\n.data\nvalue: .long 7\n.bss\nzeros: .fill 4096\n")
    r = run_path(g.elf)
    assert (r.exit.reason, r.exit.code) == ("exit-port", 7)


# --- memory outside RAM -------------------------------------------------------------------------------------
def test_write_outside_ram_without_idt_is_a_clean_triple_fault(tmp_path):
    r = run_path(build(tmp_path, "movl $1, 0x10000000\nhlt\n").flat)
    assert r.exit.reason == "triple-fault"
    assert r.state["eip"] == 0x100000                              # the faulting instruction


RESUMING_GP = """
gp:                              # record error code and EIP, count, resume at the address in `resume`
  pop %edx
  mov (%esp), %ecx
  incl %esi
  push %eax
  mov resume, %eax
  mov %eax, 4(%esp)
  pop %eax
  iret
.align 4
resume: .long 0
"""


def test_access_outside_ram_is_a_gp_for_the_guest(tmp_path):
    g = build(tmp_path, """
  pm_setup
  set_gate 13, gp, INTGATE
  xor %esi, %esi
  movl $1f, resume
beyond:
  movl $0x5a5a5a5a, 0x03000000   # beyond 32 MiB of RAM and the monitor's 1 MiB
1:
  mov %ecx, %edi
  mov 0x02000008, %ebx           # monitor memory is readable: the boot GDT's code descriptor
  movl $2f, resume
monitor:
  movl $0, 0x02000008            # but never writable
2:
  mov 0x02000008, %eax
  cmp %eax, %ebx
  jne 3f
  mov %esi, %eax
  out %al, $EXIT
3:
  exit 99
""" + RESUMING_GP + "pm_data\n")
    r = run_path(g.flat)
    assert (r.exit.reason, r.exit.code) == ("exit-port", 2)
    assert r.events["exception"]["#GP"] == 2
    assert r.state["edx"] == 0                                     # #GP(0)
    assert r.state["edi"] == g.symbols["beyond"] and r.state["ecx"] == g.symbols["monitor"]
    assert r.state["ebx"] == 0x0000FFFF


def test_guest_writing_everywhere_gets_a_clean_result(tmp_path):
    # Fill all of RAM from 0 upwards with 0xf4 (hlt) including its own code and stack: a clean end.
    r = run_path(build(tmp_path, "mov $0xf4f4f4f4, %eax\nxor %edi, %edi\nmov $0x2000000, %ecx\ncld\nrep stosb\n"
                       ).flat, max_instructions=2_000_000)
    assert r.exit.reason in ("hlt", "budget", "triple-fault")


def test_no_idt_fault_is_a_triple_fault(tmp_path):
    r = run_path(build(tmp_path, "ud2\n").flat)
    assert r.exit.reason == "triple-fault"
    assert r.events["exception"]["#UD"] == 1


def test_fault_delivering_a_fault_is_a_double_fault(tmp_path):
    # #GP's gate points at a not-present code segment: #NP while delivering #GP -> #DF -> handler runs.
    g = build(tmp_path, """
  pm_setup
  set_gate 8, df, INTGATE
  set_gate 13, gp, INTGATE
  movw $0x30, IDT + 13 * 8 + 2    # selector beyond the GDT limit: #GP while delivering #GP
  mov $0x1234, %ax
  mov %ax, %ds                   # #GP(0x1230)
df:
  mov (%esp), %ebx               # #DF error code: 0
  exit 8
gp:
  exit 13
pm_data
""")
    r = run_path(g.flat)
    assert (r.exit.reason, r.exit.code) == ("exit-port", 8)
    assert r.state["ebx"] == 0


def test_fault_delivering_a_double_fault_is_a_triple_fault(tmp_path):
    g = build(tmp_path, """
  pm_setup
  set_gate 13, gp, INTGATE
  movw $0x30, IDT + 13 * 8 + 2    # bad #GP gate, and no #DF gate at all
  mov $0x1234, %ax
  mov %ax, %ds
gp:
  exit 13
pm_data
""")
    r = run_path(g.flat)
    assert r.exit.reason == "triple-fault"


# --- privilege changes ------------------------------------------------------------------------------------
def test_int80_from_ring3_switches_to_the_tss_stack_and_iretd_returns():
    r = run_guest(str(build_sample("syscall")))
    assert r.console == "ring 3 says hi\n"
    assert (r.exit.reason, r.exit.code) == ("exit-port", 0)        # 99 if the frame or stack were wrong
    assert r.events["software-interrupt"]["int 0x80"] == len("ring 3 says hi\n") + 1
    assert r.state["cpl"] == 0 and r.state["ss"] == 0x10


def test_int_through_dpl0_gate_from_ring3_is_gp_with_vector_error_code(tmp_path):
    g = build(tmp_path, """
  pm_setup
  set_gate 0x40, kernel_only, INTGATE
  set_gate 13, gp, INTGATE
  enter_ring3 user
user:
  int $0x40
after:
  jmp after
kernel_only:
  exit 1
gp:
  mov (%esp), %ebx               # error code
  mov 4(%esp), %ecx              # return address: the int instruction
  mov 8(%esp), %edx              # the ring-3 CS
  exit 13
pm_data
""")
    r = run_path(g.flat)
    assert (r.exit.reason, r.exit.code) == ("exit-port", 13)
    assert r.state["ebx"] == 0x40 * 8 + 2
    assert r.state["ecx"] == g.symbols["user"] and r.state["edx"] == 0x1b


def test_io_from_ring3_with_iopl0_is_gp(tmp_path):
    g = build(tmp_path, """
  pm_setup
  set_gate 13, gp, INTGATE
  enter_ring3 user
user:
  mov $0x41, %al
  mov $0x3f8, %dx
port_out:
  out %al, %dx
  jmp user
gp:
  mov (%esp), %ebx
  mov 4(%esp), %ecx
  exit 13
pm_data
""")
    r = run_path(g.flat)
    assert (r.exit.reason, r.exit.code, r.console) == ("exit-port", 13, "")
    assert r.state["ebx"] == 0 and r.state["ecx"] == g.symbols["port_out"]


def test_io_from_ring3_with_iopl3_is_allowed(tmp_path):
    g = build(tmp_path, """
  pm_setup
  enter_ring3 user, 0x3002
user:
  mov $'A', %al
  mov $0x3f8, %dx
  out %al, %dx
  mov $5, %al
  out %al, $0xf4
pm_data
""")
    r = run_path(g.flat)
    assert (r.exit.reason, r.exit.code, r.console) == ("exit-port", 5, "A")


def test_io_from_ring3_follows_the_tss_io_bitmap(tmp_path):
    g = build(tmp_path, """
  pm_setup
  set_gate 13, gp, INTGATE
  mov $big_tss, %eax             # a TSS with an I/O bitmap that allows only 0x3f8-0x3ff
  mov %ax, pm_gdt+TSSSEL+2
  shr $16, %eax
  mov %al, pm_gdt+TSSSEL+4
  mov %ah, pm_gdt+TSSSEL+7
  movw $(big_tss_end - big_tss - 1), pm_gdt+TSSSEL
  movb $0x89, pm_gdt+TSSSEL+5
  movl $KSTACK, big_tss+4
  movl $KDATA, big_tss+8
  movw $104, big_tss+102
  mov $TSSSEL, %ax
  ltr %ax
  enter_ring3 user
user:
  mov $'C', %al
  mov $0x3f8, %dx
  out %al, %dx
  mov $0x3fd, %dx
  in %dx, %al
  mov %al, %bl
  mov $0, %al
denied:
  out %al, $0xf4
gp:
  mov 4(%esp), %ecx
  exit 13
pm_data
.align 4
big_tss:
  .fill 104, 1, 0
  .fill 0x3f8 / 8, 1, 0xff
  .byte 0x00
  .fill 8192 - 0x3f8 / 8 - 1, 1, 0xff
  .byte 0xff
big_tss_end:
""")
    r = run_path(g.flat)
    assert (r.exit.reason, r.exit.code, r.console) == ("exit-port", 13, "C")
    assert r.state["ebx"] & 0xFF == 0x60 and r.state["ecx"] == g.symbols["denied"]


def test_ten_thousand_gp_in_a_row_are_all_delivered():
    r = run_guest(str(build_sample("gp_storm")))
    assert (r.exit.reason, r.exit.code) == ("exit-port", 0)
    assert r.state["ebx"] == 10_000
    assert r.events["exception"]["#GP"] == 10_000


# --- timer, determinism -----------------------------------------------------------------------------------
def test_timer_interrupts_are_deterministic():
    path = str(build_sample("timer"))
    first, second = run_guest(path), run_guest(path)
    assert (first.exit.reason, first.exit.code, first.console) == ("exit-port", 10, "T\n")
    assert first.events["external-interrupt"]["vector 0x20"] == 10
    a, b = first.to_dict(), second.to_dict()
    a.pop("wall_seconds"), b.pop("wall_seconds")
    assert a == b
    # Divisor 1000 and one PIT clock per instruction: ten ticks take about 10,000 instructions.
    assert 10_000 <= first.guest_instructions < 11_000


def test_hlt_with_interrupts_enabled_waits_for_the_timer(tmp_path):
    g = build(tmp_path, """
  pm_setup
  set_gate 0x20, tick, INTGATE
  mov $0x11, %al
  out %al, $0x20
  mov $0x20, %al
  out %al, $0x21
  mov $0x04, %al
  out %al, $0x21
  mov $0x01, %al
  out %al, $0x21
  mov $0xfe, %al
  out %al, $0x21
  mov $0x30, %al                 # channel 0, lobyte/hibyte, mode 0: one shot
  out %al, $0x43
  mov $0x00, %al
  out %al, $0x40
  mov $0x10, %al                 # 4096 clocks
  out %al, $0x40
  sti
  hlt
  exit 2                         # not reached: the tick exits
tick:
  exit 1
pm_data
""")
    r = run_path(g.flat)
    assert (r.exit.reason, r.exit.code) == ("exit-port", 1)
    assert r.events["idle"]["clocks"] > 3500 and r.guest_instructions < 1000   # pm_setup: ~560


# --- UMIP -----------------------------------------------------------------------------------------------------
UMIP_GUEST = """
  pm_setup
  set_gate 13, gp, INTGATE
  set_gate 0x80, done, USERGATE
  sgdtl kernel_copy              # CPL 0: never faults
  xor %esi, %esi
  enter_ring3 user
user:
  mov $UDATA, %ax
  mov %ax, %ds
  movl $1f, resume
  sgdtl user_copy
1:
  movl $2f, resume
  smsw %eax
2:
  movl $3f, resume
  str %eax
3:
  int $0x80
done:
  mov %esi, %eax
  out %al, $EXIT
.align 4
kernel_copy: .fill 6
user_copy: .fill 6
""" + RESUMING_GP + "pm_data\n"


def test_umip_makes_sgdt_smsw_str_fault_at_cpl3(tmp_path):
    g = build(tmp_path, UMIP_GUEST)
    without = run_path(g.flat)
    assert (without.exit.reason, without.exit.code) == ("exit-port", 0)   # IA-32: they just run
    with_umip = run_path(g.flat, umip=True)
    assert (with_umip.exit.reason, with_umip.exit.code) == ("exit-port", 3)
    assert with_umip.state["cr4"] == 0x800
    assert with_umip.events["exception"]["#GP"] == 3


# --- results, the CLI, monitors ---------------------------------------------------------------------------
def test_result_document_has_exactly_the_contract_keys_and_round_trips():
    r = run_guest(str(build_sample("hello")))
    doc = r.to_dict()
    assert list(doc) == ["schema", "monitor", "guest", "exit", "console", "state", "events",
                         "guest_instructions", "modelled_cycles", "profile", "wall_seconds"]
    assert list(doc["state"]) == ["eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp", "eip", "eflags",
                                  "cs", "ds", "es", "fs", "gs", "ss", "cpl", "gdtr", "idtr", "ldtr", "tr",
                                  "cr0", "cr2", "cr3", "cr4"]
    assert doc["schema"] == 1 and doc["monitor"] == "native" and doc["exit"] == {"reason": "exit-port", "code": 0}
    assert RunResult.from_dict(json.loads(json.dumps(doc))).to_dict() == doc


def test_cli_json_and_text(capsys):
    path = str(build_sample("hello"))
    assert main(["run", path, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["console"] == "hello, world\n" and doc["exit"]["reason"] == "exit-port"
    assert main(["run", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hello, world\n") and "exit: exit-port 0" in out


def test_cli_bad_guest_and_unknown_monitor(tmp_path, capsys):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert main(["run", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and err.count("\n") == 1
    assert main(["run", str(tmp_path / "missing.bin")]) == 2
    capsys.readouterr()
    arm = tmp_path / "arm.elf"
    arm.write_bytes(b"\x7fELF\x01\x01\x01" + bytes(9) + b"\x02\x00\x28\x00" + bytes(32))
    assert main(["run", str(arm)]) == 2
    capsys.readouterr()
    assert main(["run", str(build_sample("hello")), "--monitor", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown monitor 'nope'" in err and "native" in err


def test_registry_and_ops_interface():
    assert "native" in MONITORS and get_monitor("native").name == "native"


def test_a_monitor_bug_propagates_as_an_exception():
    class Broken(MonitorOps):
        name = "broken"

        def intercept(self, machine, event):
            raise ZeroDivisionError("monitor bug")

    m = Machine()
    m.load(load_guest(str(build_sample("gp_storm"))))
    with pytest.raises(ZeroDivisionError):
        run(m, Broken())


def test_a_monitor_can_intercept_and_emulate(tmp_path):
    # A toy monitor emulates cli at ring 3 (skips it) instead of letting the guest see #GP.
    class SkipCli(MonitorOps):
        name = "skip-cli"

        def intercept(self, machine, event):
            if event.vector == 13 and machine.memory.u8(event.eip) == 0xFA:
                machine.set_reg("eip", event.eip + 1)
                machine.events.count("trap", "cli")
                return True
            return False

    m = Machine()
    m.load(load_guest(str(build_sample("gp_storm"))))
    r = run(m, SkipCli())
    assert (r.exit.reason, r.exit.code, r.state["ebx"]) == ("exit-port", 0, 0)
    assert r.events["trap"]["cli"] == 10_000


# --- helpers ----------------------------------------------------------------------------------------------
_SAMPLES: dict[str, Path] = {}


def build_sample(name: str) -> Path:
    """Build samples/guests/NAME.s once per session (into a private temporary directory)."""
    if name not in _SAMPLES:
        import tempfile
        out = Path(tempfile.mkdtemp(prefix="popek-guest-"))
        _SAMPLES[name] = build(out, GUESTS / f"{name}.s", name).flat
    return _SAMPLES[name]


def test_samples_readme_lists_every_guest():
    readme = (GUESTS / "README.md").read_text()
    for src in GUESTS.glob("*.s"):
        assert f"`{src.name}`" in readme, src.name
    assert os.path.exists(GUESTS / "pm.inc")
