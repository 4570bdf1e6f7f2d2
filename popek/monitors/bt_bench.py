"""``popek bench bt``: binary translation measured against native and the interpreter, in one process.

1. A compute-bound guest (the mix of ``popek bench emulate``: ALU, loads and stores on a small array, a
   branch) under native and bt: wall time ratio (target <= 1.3); and the same loop with a call and a
   return in every iteration, bt's worst case (an inline lookup and four more memory accesses per
   return, see bt_emit).
2. The same guest, fewer iterations, under emulate and bt: the interpreter's wall time over bt's
   (target >= 30).
3. One callout: loops of an emulated sensitive instruction against the same loop with a ``nop`` in its
   place, both under bt: (difference) / executions (target <= 3 µs).
4. Translation speed: guest instructions translated per second of translating (target >= 50,000), on a
   guest of straight-line code in many small functions.
5. Bounded memory: a guest calling functions on many code pages for ``--instructions`` guest instructions
   (10^8 for the full experiment) with a 16 KiB cache: flushes, translation runs, peak RSS.
Wall times are the run loop's (``wall_seconds``), best of three where it says so.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time

# The mix of `popek bench emulate`: ALU, loads and stores on a small array, a branch (11 per iteration).
COMPUTE = """
_start: mov ecx, {n}
        xor eax, eax
        mov esi, 0x200000
again:  add eax, ecx
        xor ebx, eax
        rol ebx, 3
        mov edx, ecx
        and edx, 0xfc
        add dword ptr [esi + edx], ebx
        mov edi, dword ptr [esi + edx]
        imul edi, edi, 33
        sub eax, edi
        dec ecx
        jnz again
        out 0xf4, al
"""

# The same with a call and a return in every iteration (15 per iteration).
CALLS = """
_start: mov esp, 0x90000
        mov ecx, {n}
        xor eax, eax
        mov esi, 0x200000
again:  add eax, ecx
        xor ebx, eax
        rol ebx, 3
        mov edx, ecx
        and edx, 0xfc
        add dword ptr [esi + edx], ebx
        mov edi, dword ptr [esi + edx]
        imul edi, edi, 33
        call mix
        sub eax, edi
        dec ecx
        jnz again
        out 0xf4, al
mix:    xor edi, ecx
        ret
"""

# A checksum over a 4 KiB buffer, a memory operand in the loop's first instruction (6 per iteration, and
# 3 more per 1,024 for the outer loop): the shape of a kernel's checksum or a copy loop.
CHECKSUM = """
_start: mov edx, {outer}
        xor eax, eax
outer:  mov esi, 0x200000
        mov ecx, 1024
again:  add eax, dword ptr [esi]
        rol eax, 5
        xor eax, ecx
        add esi, 4
        dec ecx
        jnz again
        dec edx
        jnz outer
        out 0xf4, al
"""

CALLOUT = """
_start: mov ecx, {n}
again:  {insn}
        dec ecx
        jnz again
        out 0xf4, al
        .align 4096
table:  .space 8                        ; data on a page of its own, as a kernel's would be
"""


NOTES = {"compute.s": "   (target <= 1.3)", "calls.s": "   (a call and a return per 13 instructions)",
         "checksum.s": "   (target <= 1.2)"}


def arguments(b: argparse.ArgumentParser) -> None:
    from popek.arguments import count
    b.add_argument("--iterations", type=count, default=2_000_000,
                   help="iterations of the compute-bound loops (default 2000000)")
    b.add_argument("--instructions", type=count, default=10_000_000,
                   help="guest instructions of the many-pages run (default 10^7; the experiment: 10^8)")


def _guest(text: str, name: str):
    from popek.asm import assemble_text
    from popek.machine import Guest
    program = assemble_text(text, name=name)
    return Guest(name, ((program.origin, program.image),), program.entry, "asm")


def _best(guest, monitor: str, runs: int = 3, **options):
    from popek.monitors import run_guest
    results = [run_guest(guest, monitor, max_instructions=10**10, **options) for _ in range(runs)]
    return min(results, key=lambda r: r.wall_seconds)


def _callout_cost(insn: str, n: int) -> tuple[float, int]:
    """µs per execution of ``insn`` as a callout: (its loop - the nop loop) / n, best of three each."""
    with_insn = _best(_guest(CALLOUT.format(n=n, insn=insn), "callout.s"), "bt")
    with_nop = _best(_guest(CALLOUT.format(n=n, insn="nop"), "nop.s"), "bt")
    callouts = sum(with_insn.events.get("callout", {}).values())
    return (with_insn.wall_seconds - with_nop.wall_seconds) / n * 1e6, callouts


def _translation_speed() -> tuple[float, int]:
    """Guest instructions translated per second of translating, over 400 functions of 40 instructions."""
    from popek.machine import Machine
    from popek.monitors import get_monitor
    from popek.monitors.base import run
    body = "".join(f"f{i}:\n" + "".join(f"        add eax, {j}\n        xor ebx, eax\n" for j in range(20))
                   + "        ret\n" for i in range(400))
    calls = "".join(f"        call f{i}\n" for i in range(400))
    guest = _guest(f"_start: mov esp, 0x90000\n{calls}        out 0xf4, al\n{body}", "straight.s")
    machine = Machine()
    machine.load(guest)
    ops = get_monitor("bt")
    spent = [0.0]
    run(machine, _Timed(ops, spent))
    return ops.translator.instructions / spent[0], ops.translator.instructions


class _Timed:
    """The bt ops with the translator's time accumulated (attach builds the translator)."""

    def __init__(self, ops, spent: list[float]):
        self._ops, self._spent = ops, spent

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def attach(self, machine) -> None:
        self._ops.attach(machine)
        translator = self._ops.translator
        inner, spent = translator.translate, self._spent

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t0
        translator.translate = timed


def _many_pages(instructions: int, pages: int = 256) -> str:
    """Calls into ``pages`` functions, each on a page of its own and looping 500 times, until about
    ``instructions`` have run: a working set larger than a small cache, which is flushed every round."""
    calls = "".join(f"        call f{i}\n" for i in range(pages))
    funcs = "".join(f"        .align 4096\nf{i}:\n        mov edx, 500\nf{i}_loop:\n"
                    + f"        add eax, ecx\n        rol eax, 3\n        dec edx\n        jnz f{i}_loop\n"
                    + "        ret\n" for i in range(pages))
    rounds = max(1, instructions // (pages * 2003 + 2))
    return (f"_start: mov esp, 0x90000\n        mov ecx, {rounds}\nround:\n{calls}        dec ecx\n"
            f"        jnz round\n        out 0xf4, al\n{funcs}")


def run(args: argparse.Namespace) -> str:
    import unicorn
    from popek.experiments.divergence import EQUIVALENT, judge
    _best(_guest(CALLS.format(n=1000), "warm.s"), "bt", runs=1)          # classifier, decoder, engine layout
    ratios = []
    for name, text, per in (("compute.s", COMPUTE, 11), ("calls.s", CALLS, 15), ("checksum.s", CHECKSUM, 6)):
        guest = _guest(text.format(n=args.iterations, outer=max(1, args.iterations // 1024)), name)
        native, bt = _best(guest, "native"), _best(guest, "bt")
        same = judge(native, bt).status == EQUIVALENT           # console, exit, state and guest RAM
        ratios.append((name, per, native, bt, same))

    small = _guest(COMPUTE.format(n=args.iterations // 10), "compute-small.s")
    emulated, bt_small = _best(small, "emulate", runs=1), _best(small, "bt")

    costs = [(insn, *_callout_cost(insn, 100_000)) for insn in
             ("smsw eax", "mov eax, cs", "cli", "out 0x80, al", "pushfd", "sgdt [table]", "lar eax, ecx")]
    floor, _ = _callout_cost("wbinvd", 100_000)
    speed, translated = _translation_speed()

    pages = _guest(_many_pages(args.instructions), "pages.s")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wide = _best(pages, "bt", runs=1, cache_size=0x4000)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flushes = wide.events.get("flush", {}).get("cache-full", 0)

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    lines = [f"popek bench bt: measured on {cpu}, {os.cpu_count()} CPUs, CPython {platform.python_version()}, "
             f"unicorn {unicorn.__version__}; wall times of the run loop, best of 3"]
    for name, per, native, bt, same in ratios:
        k = native.guest_instructions
        lines += [
            f"  {name}: {k:,} instructions ({args.iterations:,} iterations of {per})",
            f"    native   {native.wall_seconds:8.3f} s   {k / native.wall_seconds / 1e6:7.1f} M instructions/s",
            f"    bt       {bt.wall_seconds:8.3f} s   {k / bt.wall_seconds / 1e6:7.1f} M instructions/s   "
            f"equivalent (RAM included): {'yes' if same else 'NO'}",
            f"    ratio bt / native        {bt.wall_seconds / native.wall_seconds:6.2f}"
            + NOTES[name],
        ]
    lines += [
        f"  compute-small.s ({bt_small.guest_instructions:,} instructions): emulate {emulated.wall_seconds:.3f} s, "
        f"bt {bt_small.wall_seconds:.3f} s",
        f"    ratio emulate / bt     {emulated.wall_seconds / bt_small.wall_seconds:8.1f}   (target >= 30)",
        "  one callout for an emulated sensitive instruction: µs over the same loop with a nop, best of 3",
        f"    {'(wbinvd: the callout alone)':28s} {floor:6.2f} µs",
    ]
    lines += [f"    {insn:28s} {cost:6.2f} µs   ({n:,} callouts)" for insn, cost, n in costs]
    lines += [
        "    (target <= 3 µs; registers through the machine's raw accessors; the routines are the shared ones)",
        f"  translation: {speed:,.0f} guest instructions/s ({translated:,} translated)   (target >= 50,000)",
        f"  many code pages: {wide.guest_instructions:,} instructions over 256 pages with a 16 KiB cache, "
        f"{wide.wall_seconds:.2f} s: {flushes:,} flushes, {wide.events['translation']['runs']:,} translation runs; "
        f"peak RSS {after / 1024:.0f} MiB (+{(after - before) / 1024:.0f} MiB during the run)",
    ]
    return "\n".join(lines)
