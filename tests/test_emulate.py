"""The ``emulate`` monitor: the pure interpreter. Equivalent to native, and it sees every instruction.

Equivalence on every sample guest (samples/guests/*.s, each assembled once), exact instruction counting,
counts by canonical name, the decode cache under self-modifying code and under paging (where the bytes at
a linear address are not the bytes at the same physical address), the budget, and the CLI. Generated
guests are compared in tests/test_differential.py; the cost is measured by ``popek bench emulate``, never
by a timed test.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from popek.asm import assemble_text
from popek.cli import main
from popek.experiments.differential import compare, differences
from popek.machine import Guest, load_guest
from popek.monitors import get_monitor, run_guest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "samples" / "guests"
SAMPLES = sorted(GUESTS.glob("*.s"))


def build(body: str, name: str = "guest") -> Guest:
    program = assemble_text('        .include "pm.inc"\n_start:\n' + body, name=name, include_dirs=[GUESTS])
    return Guest(name, ((program.origin, program.image),), program.entry, "asm", program.symbols)


def both(guest: Guest, **kw):
    native, emulated = run_guest(guest, "native", **kw), run_guest(guest, "emulate", **kw)
    assert differences(native, emulated) == []
    return native, emulated


def test_registered_by_name():
    ops = get_monitor("emulate")
    assert ops.name == "emulate"


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_every_sample_guest_runs_the_same_as_native(path):
    guest = load_guest(str(path))
    native, emulated = both(guest)
    # The interpreter stepped every instruction the machine counted, and nothing else.
    assert emulated.events["interpret"]["instructions"] == native.guest_instructions
    assert emulated.monitor == "emulate"


def test_counts_sensitive_instructions_by_canonical_name():
    native, r = both(build("""
        pm_setup
        mov ecx, 5
again:
        sgdt [table]
        smsw eax
        pushfd
        popfd
        push ds
        pop es
        mov ax, ss
        mov bx, 0x10
        mov fs, bx
        loop again
        cli
        hlt
        .align 4
table:  .space 6
        pm_data
"""))
    seen = r.events["sensitive"]
    assert {k: seen[k] for k in ("sgdt", "smsw", "pushf", "popf", "push_seg", "pop_seg", "mov_from_seg")} == \
        {"sgdt": 5, "smsw": 5, "pushf": 5, "popf": 5, "push_seg": 5, "pop_seg": 5, "mov_from_seg": 5}
    # pm_setup's five segment loads (and ltr, lgdt, lidt, the far jump) plus the loop's five mov fs.
    assert seen["mov_to_seg"] == 5 + 5 and seen["ltr"] == seen["lgdt"] == seen["lidt"] == seen["jmp_far"] == 1
    assert seen["cli"] == seen["hlt"] == 1
    assert "mov" not in seen and "loop" not in seen          # innocuous instructions are not named
    assert r.events["interpret"]["instructions"] == native.guest_instructions


def test_decodes_each_address_once():
    native, r = both(build("mov ecx, 100000\nagain: add eax, ecx\nloop again\nhlt\n"))
    assert native.guest_instructions == 200_002
    assert r.events["interpret"]["decoded"] == 4                 # mov, add, loop, hlt
    assert r.events["sensitive"] == {"hlt": 1}


def test_self_modifying_code_is_classified_by_its_current_bytes():
    # The first pass runs two nops; the store turns the first into cli, which the next passes run.
    native, r = both(build("""
        mov ecx, 3
again:
patch:  nop
        nop
        mov byte ptr [patch], 0xfa
        loop again
        hlt
"""))
    assert r.events["sensitive"] == {"cli": 2, "hlt": 1}
    assert r.events["interpret"]["code-changed"] == 1
    # 1 + 3 * 4 + 1 instructions, as on the CPU: Unicorn runs each store into the running block twice, and
    # the machine and the interpreter both take the second attempt off (tests/regressions/smc-store-counted-twice.s).
    assert r.events["interpret"]["instructions"] == native.guest_instructions == 1 + 3 * 4 + 1



def test_a_sensitive_instruction_storing_into_its_own_block_is_counted_once_per_execution():
    # push cs writes 08 00 00 00 (or [eax], al; add [eax], al) over the four nops after it, in the block
    # running it: Unicorn runs it twice each time, and the interpreter counts it once, as the CPU runs it.
    native, r = both(build("""
        pm_setup
        mov eax, offset scratch
        mov ecx, 3
again:  mov esp, offset patch + 4
        push cs
patch:  nop
        nop
        nop
        nop
        loop again
        cli
        hlt
        .align 4
scratch: .long 0
        pm_data
"""))
    assert r.events["sensitive"]["push_seg"] == 3
    assert r.events["corrected"]["smc-rerun"] == 3
    assert r.events["interpret"]["instructions"] == native.guest_instructions


PAGING = """
        pm_setup
        mov edi, 0x300000               ; page directory: 4 MiB pages (CR4.PSE)
        mov ecx, 1024
        xor eax, eax
        rep stosd
        mov dword ptr [0x300000], 0x83  ; linear 0-4 MiB -> physical 0 (present, writable, 4 MiB)
        mov dword ptr [0x300004], 0x83  ; linear 4-8 MiB -> physical 0 as well: an alias
        mov eax, cr4
        or eax, 0x10
        mov cr4, eax
        mov eax, 0x300000
        mov cr3, eax
        mov eax, cr0
        or eax, 0x80000000
        mov cr0, eax
        jmp aliased + 0x400000          ; run the code below through the alias
aliased:
        mov ecx, 5
again:
        sgdt [table]
        smsw eax
        loop again
        hlt
        .align 4
table:  .space 6
        pm_data
"""


def test_under_paging_code_is_fetched_through_the_page_tables():
    # At linear 0x5xxxxx the physical bytes are zeros (RAM nobody wrote): a physical fetch would see
    # `add [eax], al` there instead of sgdt/smsw.
    native, r = both(build(PAGING))
    assert native.state["cr0"] & 0x80000000 and native.state["eip"] >= 0x400000
    assert r.events["sensitive"]["sgdt"] == 5 and r.events["sensitive"]["smsw"] == 5
    assert r.events["sensitive"]["mov_cr"] == 5
    assert r.events["interpret"]["instructions"] == native.guest_instructions


def test_budget_ends_the_run_at_the_same_instruction():
    native, r = both(build("again: inc eax\njmp again\n"), max_instructions=12_345)
    assert (r.exit.reason, r.guest_instructions, r.events["interpret"]["instructions"]) == ("budget", 12_345, 12_345)


def test_faults_and_interrupts_are_delivered_exactly_as_natively():
    # gp_storm: 10,000 #GP at ring 3, each counted once by the interpreter (an attempt is an instruction).
    guest = load_guest(str(GUESTS / "gp_storm.s"))
    native, r = both(guest)
    assert r.events["sensitive"]["cli"] == 10_000 and r.events["exception"]["#GP"] == 10_000
    assert r.events["interpret"]["instructions"] == native.guest_instructions


def test_cli_runs_emulate(capsys):
    assert main(["run", str(GUESTS / "hello.s"), "--monitor", "emulate", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["monitor"] == "emulate" and doc["console"] == "hello, world\n"
    assert doc["events"]["interpret"]["instructions"] == doc["guest_instructions"]
    assert doc["events"]["sensitive"]["out"] == 14


def test_compare_reports_no_divergence_on_a_sample():
    assert compare(str(GUESTS / "timer.s"), "native", "emulate") is None
