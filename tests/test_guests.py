"""The sample guests of samples/guests/ under every monitor, from one expectation table.

``TABLE`` has one row per guest. A row holds what the guest does on the bare machine (``native``: its
console line by line and its exit code) and, for other monitors, a cell only where that monitor is *not*
expected to reproduce it. Every monitor in ``popek.monitors.MONITORS`` runs every guest (selection by
exclusion, like capa's shared feature table and Lark's ``_TO_TEST``): a new guest runs everywhere, and a
new monitor is held to native on all of them at once. Cells:

- absent, or ``SAME``: console and exit code exactly as native;
- ``Diverges(at, line, reason, exit_code=None)``: the expected divergence (trap-and-emulate on IA-32),
  *run and checked*, not skipped: console lines before ``line`` (1-based) as native, line ``line``
  different from native's (or missing), the exit code if given; ``at`` is the canonical instruction
  name (DESIGN §3.1) the divergence comes from;
- ``Pending(reason)``: the column is not filled in yet. The guest still runs (a clean end, deterministic),
  then the test is an expected failure whose message names the first line that differs from native, which
  is what the ``Diverges`` cell will say.

Filling in the trap column is one edit per row, e.g. for store_tables.s replace
``{"trap": TRAP_PENDING}`` by ``{"trap": Diverges("sgdt", line=3, reason="sgdt stores the monitor's GDTR")}``
(samples/guests/README.md predicts the cell for each guest).
A cell that is none of these, a monitor name the registry does not know, or an ``at`` that is not a
canonical name is an error when the module is collected. A monitor that is registered but not built yet
is skipped as a whole column with that reason.

Every run is made twice: the console, the instruction count and the whole result document (minus wall
time) must be identical. Native lines are literal, or a ``re.Pattern`` (``rx``) where a number depends on
the machine's interrupt sampling policy (ticks) rather than on the guest; see samples/guests/README.md
for what each guest shows and why.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from popek.errors import UsageError
from popek.isa.language import bundled
from popek.machine.result import REASONS, Exit
from popek.monitors import MONITORS, get_monitor, run_guest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "samples" / "guests"


# --- the cells -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Native:
    """What the guest prints on the bare machine, line by line, and its exit code."""

    lines: tuple[str | re.Pattern, ...]
    exit_code: int


@dataclass(frozen=True)
class Same:
    """The monitor reproduces native exactly (console and exit code)."""


@dataclass(frozen=True)
class Diverges:
    at: str                     # canonical instruction name (DESIGN §3.1)
    line: int                   # 1-based console line that first differs from native
    reason: str
    exit_code: int | None = None


@dataclass(frozen=True)
class Pending:
    reason: str


@dataclass(frozen=True)
class Crashes:
    """The domain crashes (pv: the run ends with reason ``crash``) at the instruction ``at`` (canonical
    name), which the crash message names first."""

    at: str
    reason: str


SAME = Same()
TRAP_PENDING = Pending("trap column not filled in yet (the trap monitor is being written)")
CELLS = (Same, Diverges, Pending, Crashes)
# A monitor's cell for the rows that do not name one. An unported kernel under pv runs at ring 1 and its
# first privileged instruction (pm_setup's lgdt, for every guest built on pm.inc) is a #GP with no trap
# table: the domain crashes, and the message says what a PV kernel does instead.
DEFAULT_CELLS = {"pv": Crashes("lgdt", "unported: lgdt at ring 1 is a #GP the hypervisor does not emulate")}
# Guests with a paravirtual port (the same source built with -D PV, samples/guests/platform.inc): their PV
# build under pv must print exactly the native build's console and exit code.
PV_PORTS = ("hello", "timer", "syscall", "kernel", "critical_section")


@dataclass(frozen=True)
class Row:
    guest: str
    native: Native
    monitors: dict = field(default_factory=dict)    # monitor name -> cell; absent means SAME


def rx(pattern: str) -> re.Pattern:
    """A console line whose numbers depend on timing policy, not on the guest."""
    return re.compile(pattern)


def lines(text: str) -> tuple[str, ...]:
    return tuple(text.splitlines())


# --- the table -------------------------------------------------------------------------------------------
TABLE = [
    Row("store_tables", Native(lines("""\
store_tables: SGDT SIDT SLDT STR SMSW read back what the kernel loaded
loaded: gdt base=00001000 limit=0027, idt base=00001800 limit=00ff, ldtr=0018, tr=0020, cr0=00050033
sgdt: base=00001000 limit=0027 -> ok
sidt: base=00001800 limit=00ff -> ok
sldt: 0018 (stored dword dead0018) -> ok
str: 0020 -> ok
smsw: 0033 -> ok
mov from cr0: 00050033 -> ok
store_tables: 6 checks, 0 differ"""), 0x10),
        {"trap": Diverges("sgdt", line=3, reason="sgdt stores the shadow GDT's base in monitor memory", exit_code=21)}),

    Row("flags", Native(lines("""\
flags: PUSHF/POPF and the interrupt flag in a ring-0 kernel
after setup; pushf: eflags=00000046 IF=0 IOPL=0 -> ok
sti; pushf: eflags=00000246 IF=1 IOPL=0 -> ok
cli; pushf: eflags=00000046 IF=0 IOPL=0 -> ok
popf IF=1; pushf: eflags=00000202 IF=1 IOPL=0 -> ok
popf IF=0; pushf: eflags=00000002 IF=0 IOPL=0 -> ok
popf IOPL=3; pushf: eflags=00003002 IF=0 IOPL=3 -> ok
popf IOPL=0; pushf: eflags=00000002 IF=0 IOPL=0 -> ok
popf OF SF ZF AF PF CF; pushf: eflags=000008d7 IF=0 IOPL=0 -> ok
flags: 8 checks, 0 differ"""), 0x20),
        {"trap": Diverges("pushf", line=2, reason="pushf shows the real IF=1 the monitor keeps, not the guest's cli", exit_code=36)}),

    Row("segments_read", Native(lines("""\
segments_read: the kernel reads CS and SS to learn its privilege level
push cs: 0008 rpl=0 -> ok
mov r, cs: 0008 rpl=0 -> ok
push ss: 0010 rpl=0 -> ok
mov r, ss: 0010 rpl=0 -> ok
mov r, ds: 0010 rpl=0 -> ok
kernel takes the ring-0 path -> ok
ring 3, push cs: 001b rpl=3 -> ok
ring 3, mov r, ss: 0023 rpl=3 -> ok
segments_read: 8 checks, 0 differ"""), 0x30),
        {"trap": Diverges("push_seg", line=2, reason="push cs shows RPL 3, the real ring of the deprivileged kernel", exit_code=55)}),

    Row("descriptors", Native(lines("""\
descriptors: LAR LSL VERR VERW on the kernel's own GDT, at CPL 0
0008 ring-0 code: lar 00c09b00, lsl ffffffff, verr 1, verw 0 -> ok
0010 ring-0 data: lar 00c09300, lsl ffffffff, verr 1, verw 1 -> ok
000b ring-0 code, RPL 3: lar fail, lsl fail, verr 0, verw 0 -> ok
0013 ring-0 data, RPL 3: lar fail, lsl fail, verr 0, verw 0 -> ok
0039 ring-1 data: lar 00c0b300, lsl ffffffff, verr 1, verw 1 -> ok
001b ring-3 code: lar 00c0fb00, lsl ffffffff, verr 1, verw 0 -> ok
0023 ring-3 data: lar 00c0f300, lsl ffffffff, verr 1, verw 1 -> ok
0028 TSS (busy): lar 00008b00, lsl 00000067, verr 0, verw 0 -> ok
0040 beyond the GDT limit: lar fail, lsl fail, verr 0, verw 0 -> ok
0000 null: lar fail, lsl fail, verr 0, verw 0 -> ok
descriptors: 10 checks, 0 differ"""), 0x40),
        {"trap": Diverges("lar", line=2, reason="lar answers for the ring-compressed descriptor at the real CPL", exit_code=70)}),

    Row("segments_load", Native(lines("""\
segments_load: a ring-0 kernel loads DS, ES, SS with its own and with foreign selectors
mov ds, 0010: ds=0010 -> ok
mov es, 0010: es=0010 -> ok
mov ds, 0023: ds=0023 -> ok
mov es, 0039: es=0039 -> ok
mov ds, 0013: #GP(0010) ds=0010 -> ok
mov es, 0011: #GP(0010) es=0010 -> ok
mov ds, 0000: ds=0000 -> ok
mov ds, 0008: ds=0008 -> ok
mov ds, 0028: #GP(0028) ds=0010 -> ok
mov ss, 0010: ss=0010 -> ok
mov ss, 0023: #GP(0020) ss=0010 -> ok
mov ss, 0013: #GP(0010) ss=0010 -> ok
mov ss, 0039: #GP(0038) ss=0010 -> ok
mov ss, 0000: #GP(0000) ss=0010 -> ok
mov ss, 0008: #GP(0008) ss=0010 -> ok
pop ds, 0010: ds=0010 -> ok
pop es, 0013: #GP(0010) es=0010 -> ok
pop ss, 0010: ss=0010 -> ok
pop ss, 0023: #GP(0020) ss=0010 -> ok
segments_load: 19 checks, 0 differ"""), 0x50),
        {"trap": Diverges("mov_to_seg", line=6, reason="with ring-compressed descriptors a load that faults at ring 0 succeeds", exit_code=91)}),

    Row("far_transfers", Native(lines("""\
far_transfers: far jmp/call/ret, call gates, int n and iret; where each one lands
jmp far 0008: cs=0008 esp=0007ff00 -> ok
call far 0008: cs=0008 esp=0007fef8 ret=0008:site -> ok
retf to 0008: cs=0008 esp=0007ff00 -> ok
call far gate 0040 (DPL 0): cs=0008 esp=0007fef8 ret=0008:site -> ok
retf from the gate: cs=0008 esp=0007ff00 -> ok
int 0x81 (DPL-0 gate): cs=0008 esp=0007fef4 ret=0008:site -> ok
iretd to 0008: cs=0008 esp=0007ff00 -> ok
iretd to ring 3: cs=001b esp=00070000 -> ok
int 0x82 (DPL-3 gate) from ring 3: cs=0008 esp=0007ffec ret=001b:site from=0023:00070000 -> ok
iretd back to ring 3: cs=001b esp=00070000 -> ok
call far gate 004b (DPL 3) from ring 3: cs=0008 esp=0007fff0 ret=001b:site from=0023:00070000 -> ok
retf back to ring 3: cs=001b esp=00070000 -> ok
int 0x81 (DPL-0 gate) from ring 3: #GP(040a) -> ok
call far 0008 from ring 3: #GP(0008) -> ok
jmp far 0008 from ring 3: #GP(0008) -> ok
retf to 0008 from ring 3: #GP(0008) -> ok
far_transfers: 16 checks, 0 differ"""), 0x60),
        {"trap": Diverges("mov_from_seg", line=2, reason="the landing CS the kernel reads back carries RPL 3", exit_code=111)}),

    Row("critical_section", Native((
        "critical_section: timer ticks that land inside a section the kernel protected",
        rx(r"cli/sti: ticks=[1-9]\d* inside=0 after=[1-9]\d* -> ok"),
        rx(r"popf: ticks=[1-9]\d* inside=0 after=[1-9]\d* -> ok"),
        rx(r"cli/popf: ticks=[1-9]\d* inside=0 after=[1-9]\d* -> ok"),
        "critical_section: 3 checks, 0 differ"), 0x70),
        {"trap": Diverges("popf", line=3, reason="popf at CPL 3 silently keeps IF: the timer enters the critical section", exit_code=114)}),

    Row("kernel", Native((
        "kernel: booting at cpl 0 -> ok",
        "kernel: gdt, idt, tss loaded; timer every 1000 instructions",
        "kernel: starting the task in ring 3",
        "task: hello from ring 3",
        rx(r"task: ticks\(\) = \d+"),
        "task: sleep(3)",
        rx(r"task: ticks\(\) = \d+"),
        "task: sum of 1..3000 = 4501500",
        "task: system call 99",
        "kernel: unknown system call 99",
        "task: it returned -1",
        "task: exit(7)",
        rx(r"kernel: task exited with code 7 after 17 system calls and \d+ ticks -> ok"),
        "kernel: 2 checks, 0 differ"), 0x80),
        {"trap": Diverges("mov_from_seg", line=1, reason="the kernel reads its CPL from CS and finds 3", exit_code=143)}),

    # The machine's own samples (tests/test_machine.py tests them in detail).
    Row("hello", Native(("hello, world",), 0), {"pv": SAME}),      # only granted ports: it runs unported
    Row("timer", Native(("T",), 10), {}),
    Row("syscall", Native(("ring 3 says hi",), 0), {"trap": Diverges("iret", line=1, reason="the kernel's iret to ring 3 is a same-ring return at real ring 3: SS:ESP not popped", exit_code=99)}),
    Row("gp_storm", Native((), 0), {}),

    # Adversarial guests for binary translation (samples/guests/README.md); bt must reproduce all of them.
    Row("bt_overlap", Native(lines("""\
middle then start: 00000002 00000000 02eb4040 00000002 -> ok
start then middle: 02eb4040 00000002 00000002 00000002 -> ok
indirect into an immediate: 00000004 -> ok
bt_overlap: 3 checks, 0 differ"""), 0x90), {}),
    Row("bt_selfread", Native(lines("""\
call rel32: 000016e8 -> ok
jcc, jmp, ret: 00eb0074 -> ok
sgdt, cli, sti, pushf, mov ax,cs: 8805010f -> ok
read through a computed pointer: 2241d27c -> ok
image checksum: f6da97aa
bt_selfread: 4 checks, 0 differ"""), 0xA0),
        {"trap": Diverges("mov_to_seg", line=5, reason="segment loads read the shadow GDT, so the CPU never sets "
                          "the accessed bits in the guest's own table, which the image checksum covers")}),
    Row("bt_segprobe", Native(lines("""\
jmp past the limit: #UD at 0040:00000379 (hardware: #GP(0000) at eip=00000372)
falling past the limit: #UD at 0040:00000377 eax=00000003 (hardware: #GP(0000) at eip=00000376)
call in a based segment: pushed 00000380 -> ok
int 0x81 in a based segment: frame 0048:00000382 -> ok
fault in a callee: #UD at 0048:0000038e -> ok
bt_segprobe: 3 checks, 0 differ"""), 0xB0), {}),
    Row("bt_redpill", Native(lines("""\
red pill (sidt in a buffer): base=00200000 limit=07ff (top byte <= d0: no VM) -> ok
rewritten: sgdt base=00100760 -> ok
rewritten: str=0028 -> ok
rewritten: smsw=0011 -> ok
ring 3 red pill (buffer): base=00200000 -> ok
ring 3 sidt/sgdt (image): 00200000 00100760 -> ok
bt_redpill: 6 checks, 0 differ"""), 0xC0),
        {"trap": Diverges("sidt", line=1, reason="sidt in the stub stores the monitor's IDT base in monitor memory",
                          exit_code=0xC5)}),
    Row("bt_selfpatch", Native(lines("""\
next instruction: 03 -> ok
patched function: 00000001 00000002 -> ok
flipped branch: 03 -> ok
patched in the loop: 31 -> ok
replaced routine: 0000600d 0000beef -> ok
other page: 11 77 -> ok
data beside code: 300 -> ok
bt_selfpatch: 7 checks, 0 differ"""), 0xD0), {}),
    Row("paging", Native(lines("""\
paging: the kernel's own page tables, a true #PF, a PTE rewrite
mov from cr3: 00180000 -> ok
true #PF handled by the kernel: [PAGE_B]=33333333 faults=00000001 cr2=00301000 -> ok
PTE rewritten, invlpg: [PAGE_A]=22222222 -> ok
cr2 after the handler: 00301000 -> ok
paging: 4 checks, 0 differ"""), 0xE0)),
]
ROWS = {row.guest: row for row in TABLE}
CANONICAL = frozenset(bundled().instructions)


def check_table(table: list[Row]) -> None:
    """An unknown monitor, cell type or instruction name is an error at collection, not a silent pass."""
    assert len({row.guest for row in table}) == len(table), "a guest has two rows"
    for row in table:
        assert (GUESTS / f"{row.guest}.s").is_file(), f"{row.guest}: no samples/guests/{row.guest}.s"
        assert "native" not in row.monitors, f"{row.guest}: native is the row's reference, not a cell"
        for monitor, cell in row.monitors.items():
            assert monitor in MONITORS, f"{row.guest}: unknown monitor {monitor!r} (known: {', '.join(MONITORS)})"
            assert isinstance(cell, CELLS), f"{row.guest}/{monitor}: unknown cell {cell!r}"
            if isinstance(cell, (Diverges, Crashes)):
                assert cell.at in CANONICAL, f"{row.guest}/{monitor}: {cell.at!r} is not a canonical name"
                assert 1 <= cell.line <= len(row.native.lines) + 1, f"{row.guest}/{monitor}: line {cell.line}"
                assert cell.reason, f"{row.guest}/{monitor}: a divergence needs a reason"


check_table(TABLE)


# --- running ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def run_twice(guest: str, monitor: str):
    """Two runs of one guest under one monitor; the second must repeat the first exactly."""
    path = str(GUESTS / f"{guest}.s")
    first, second = run_guest(path, monitor=monitor), run_guest(path, monitor=monitor)
    return first, second


def line_matches(expected: str | re.Pattern, actual: str) -> bool:
    if isinstance(expected, re.Pattern):
        return expected.fullmatch(actual) is not None
    return expected == actual


def first_difference(native: Native, console: str) -> int | None:
    """The 1-based number of the first console line that differs from native's, or None."""
    actual = console.splitlines()
    for number, expected in enumerate(native.lines, 1):
        if number > len(actual) or not line_matches(expected, actual[number - 1]):
            return number
    if len(actual) > len(native.lines):
        return len(native.lines) + 1
    return None


def describe(native: Native, console: str, number: int) -> str:
    actual = console.splitlines()
    want = native.lines[number - 1] if number <= len(native.lines) else "(no line)"
    got = actual[number - 1] if number <= len(actual) else "(no line)"
    want = want.pattern if isinstance(want, re.Pattern) else want
    return f"line {number}: expected {want!r}, got {got!r}"


CASES = [pytest.param(row.guest, monitor, id=f"{row.guest}-{monitor}") for row in TABLE for monitor in MONITORS]


@pytest.mark.parametrize("guest, monitor", CASES)
def test_guest_under_monitor(guest: str, monitor: str):
    try:
        get_monitor(monitor)
    except UsageError as exc:
        pytest.skip(f"{exc}: its column is checked once it is")
    row = ROWS[guest]
    cell = SAME if monitor == "native" else row.monitors.get(monitor, DEFAULT_CELLS.get(monitor, SAME))
    first, second = run_twice(guest, monitor)

    # Deterministic: the same console, instruction count and result document (minus wall time).
    a, b = first.to_dict(), second.to_dict()
    a.pop("wall_seconds"), b.pop("wall_seconds")
    assert (first.console, first.guest_instructions) == (second.console, second.guest_instructions)
    assert a == b
    assert first.exit.reason in REASONS

    message = judge(row.native, cell, first)
    if message is not None:
        pytest.xfail(message)


def judge(native: Native, cell, result) -> str | None:
    """Assert what ``cell`` expects of ``result``; for a Pending cell, return the expected-failure message."""
    differs = first_difference(native, result.console)
    if isinstance(cell, Same):
        assert differs is None, describe(native, result.console, differs) + f"\n{result.console}"
        assert (result.exit.reason, result.exit.code) == ("exit-port", native.exit_code), result.exit
        return None
    if isinstance(cell, Crashes):
        assert result.exit.reason == "crash", (result.exit, cell.reason)
        assert result.exit.why.startswith(f"{cell.at} at "), result.exit.why
        return None
    if isinstance(cell, Diverges):
        assert differs == cell.line, (
            f"expected the divergence at line {cell.line} ({cell.at}: {cell.reason}), "
            + ("but the console is native's" if differs is None else describe(native, result.console, differs)))
        if cell.exit_code is not None:
            assert result.exit.code == cell.exit_code, result.exit
        return None
    assert isinstance(cell, Pending), cell
    where = "behaves like native" if differs is None else describe(native, result.console, differs)
    return f"{cell.reason}; observed: {where}; exit {result.exit.reason} {result.exit.code}"


@functools.lru_cache(maxsize=None)
def run_pv_build_twice(guest: str):
    from popek.machine.guest import load_guest
    build = load_guest(str(GUESTS / f"{guest}.s"), defines={"PV": 1})
    return run_guest(build, monitor="pv"), run_guest(build, monitor="pv")


@pytest.mark.parametrize("guest", PV_PORTS)
def test_pv_build_under_pv_prints_what_native_prints(guest: str):
    first, second = run_pv_build_twice(guest)
    a, b = first.to_dict(), second.to_dict()
    a.pop("wall_seconds"), b.pop("wall_seconds")
    assert a == b
    judge(ROWS[guest].native, SAME, first)


# --- the table itself ------------------------------------------------------------------------------------
def test_every_sample_guest_has_a_row():
    missing = sorted(p.stem for p in GUESTS.glob("*.s") if p.stem not in ROWS)
    assert not missing, f"add a row to TABLE for {missing}"


def test_observation_guests_end_with_their_summary_and_exit_code():
    # GUEST_ID * 16 + the number of differing checks (console.inc): 0 natively for every one of them.
    for number, guest in enumerate(("store_tables", "flags", "segments_read", "descriptors", "segments_load",
                                    "far_transfers", "critical_section", "kernel"), 1):
        native = ROWS[guest].native
        assert native.exit_code == number * 16
        assert re.fullmatch(rf"{guest}: \d+ checks, 0 differ", native.lines[-1])


@pytest.mark.parametrize("bad, message", [
    ({"nosuch": SAME}, "unknown monitor"),
    ({"trap": "diverges"}, "unknown cell"),
    ({"trap": Diverges("sgdtx", 3, "typo")}, "not a canonical name"),
    ({"trap": Diverges("sgdt", 99, "past the end")}, "line 99"),
    ({"native": SAME}, "reference"),
])
def test_a_bad_cell_is_an_error(monkeypatch, bad, message):
    monkeypatch.setattr(__import__(__name__), "TABLE", [Row("hello", Native(("hello, world",), 0), bad)])
    monkeypatch.setattr(__import__(__name__), "ROWS", {"hello": None})
    with pytest.raises(AssertionError, match=message):
        check_table(TABLE)


def test_judging_each_kind_of_cell():
    native = Native(("title", "sgdt: 00001000 -> ok", rx(r"ticks=\d+"), "done"), 0x10)
    same = SimpleNamespace(console="title\nsgdt: 00001000 -> ok\nticks=7\ndone\n", exit=Exit("exit-port", 0x10))
    moved = SimpleNamespace(console="title\nsgdt: 02000000 -> DIFFERS\nticks=7\ndone\n", exit=Exit("exit-port", 0x11))
    sgdt = Diverges("sgdt", 2, "sgdt stores the monitor's GDTR", exit_code=0x11)
    assert judge(native, SAME, same) is None
    assert judge(native, sgdt, moved) is None
    with pytest.raises(AssertionError, match="line 2"):
        judge(native, SAME, moved)
    with pytest.raises(AssertionError, match="console is native's"):
        judge(native, sgdt, same)
    with pytest.raises(AssertionError, match="expected the divergence at line 3"):
        judge(native, Diverges("sgdt", 3, "wrong line"), moved)
    with pytest.raises(AssertionError):
        judge(native, Diverges("sgdt", 2, "wrong exit code", exit_code=0x12), moved)
    assert "line 2: expected 'sgdt: 00001000 -> ok'" in judge(native, TRAP_PENDING, moved)
    assert "behaves like native" in judge(native, TRAP_PENDING, same)


def test_a_divergence_is_located_by_line():
    native = Native(("a", rx(r"b \d+"), "c"), 0)
    assert first_difference(native, "a\nb 12\nc\n") is None
    assert first_difference(native, "a\nb x\nc\n") == 2
    assert first_difference(native, "a\nb 1\n") == 3
    assert first_difference(native, "a\nb 1\nc\nd\n") == 4
