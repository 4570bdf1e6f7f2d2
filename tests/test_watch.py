"""``popek.machine.watch``: every execution of a watched instruction is seen, no other instruction is, and
code the guest rewrites is classified again before it runs."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from popek.asm import assemble_text
from popek.machine import Guest, Machine
from popek.machine.watch import Watch
from popek.monitors.base import MonitorOps, run

GUESTS = Path(__file__).resolve().parent.parent / "samples" / "guests"


def _run_watching(body: str, names) -> tuple[Counter, Machine]:
    program = assemble_text('        .include "pm.inc"\n_start:\n' + body, include_dirs=[GUESTS])
    machine = Machine()
    machine.load(Guest("watched", ((program.origin, program.image),), program.entry, "asm"))
    seen: Counter = Counter()
    Watch(machine, names, lambda address, name: seen.update([name]), kind="umip")
    result = run(machine, MonitorOps(), 10_000_000)
    assert result.exit.reason == "exit-port", result.exit
    return seen, machine


def test_a_loop_of_n_cpuid_is_seen_n_times_and_cli_never():
    seen, _ = _run_watching("""
        mov esi, 777                    ; cpuid writes ecx, so the count lives in esi
again:  mov eax, 0
        cpuid
        cli
        dec esi
        jnz again
        mov ecx, 10000
spin:   cli
        loop spin
        exit 0
""", {"cpuid", "hlt"})
    assert seen == Counter({"cpuid": 777})


def test_code_rewritten_into_a_watched_instruction_is_seen():
    # The loop body starts as two NOPs; after the first pass the guest patches them into cpuid (0F A2).
    seen, machine = _run_watching("""
        mov esi, 5
again:  mov eax, 0
patch:  nop
        nop
        mov word ptr [patch], 0xA20F
        dec esi
        jnz again
        exit 0
""", {"cpuid"})
    assert seen == Counter({"cpuid": 4})
    assert machine.events.get("umip", "blocks-rescanned") >= 1


def test_an_unknown_name_is_a_programming_error():
    machine = Machine()
    try:
        Watch(machine, {"cpuidd"}, lambda a, n: None, kind="umip")
    except AssertionError as exc:
        assert "cpuidd" in str(exc)
    else:
        raise AssertionError("an unknown canonical name was accepted")
