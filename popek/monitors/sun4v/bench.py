"""`popek bench sun4v`: what the third privilege level buys, measured in one run.

- µs per fast trap of the model: a loop of N ``cpu_myid`` fast traps against its empty twin (the same loop
  without the ``int 0x80``), best of three, divided by N;
- monitor entries (``popek.events.monitor_entries``: traps, callouts, hypercalls, software deliveries,
  upcalls, exits, hyperprivileged traps) per sample guest under trap, bt, pv, hvm and sun4v, each on its
  platform's build (-D PV, -D SUN4V), with whether it ended with the native build's exit code (each of
  these guests encodes its own checks in it);
- the nanobenchmarks (samples/nanobench) under sun4v: entries, µs and modelled cycles on the
  ultrasparc-t1 profile per operation, (op run - EMPTY run) / N;
- the sun4v column of ``popek compare`` on the ultrasparc-t1 profile: modelled cycles against native's.
Wall times are this Python model's on this host, not real hardware's; modelled cycles are the events
priced on a profile whose every sun4v number is assumed (``popek profiles ultrasparc-t1``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[3] / "samples"
GUESTS = ("hello", "timer", "syscall", "kernel", "critical_section", "store_tables", "flags", "segments_read",
          "descriptors", "far_transfers")
MONITORS = ("trap", "bt", "pv", "hvm", "sun4v")
NANO = ("syscall", "divzero", "callret", "crwr", "pgfault", "ptemod")
PROFILE = "ultrasparc-t1"
FAST_TRAP_LOOP = """
        .include "pm.inc"
_start:
        mov edi, {n}
again:
        .ifndef EMPTY
        mov ebp, 0x16                   ; cpu_myid
        int 0x80
        .endif
        dec edi
        jnz again
        exit 0
        pm_data
"""


def arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--iterations", type=int, default=20_000, help="fast traps in the timed loop (default 20000)")


def _best(guest, monitor: str, runs: int = 3):
    from popek.monitors import run_guest
    results = [run_guest(guest, monitor=monitor, profile=PROFILE) for _ in range(runs)]
    return min(r.wall_seconds for r in results), results[0]


def run(args: argparse.Namespace) -> str:
    from popek.asm import assemble_text
    from popek.errors import UsageError
    from popek.events import monitor_entries
    from popek.machine.guest import Guest, load_guest
    from popek.monitors import platform_defines

    n = args.iterations
    if n < 1:
        raise UsageError("--iterations must be at least 1")

    def loop(empty: bool) -> Guest:
        program = assemble_text(FAST_TRAP_LOOP.format(n=n), defines={"SUN4V": 1, **({"EMPTY": 1} if empty else {})},
                                include_dirs=(str(SAMPLES / "guests"),))
        return Guest("fast-traps", ((program.origin, bytes(program.image)),), program.entry, "asm")

    full, full_result = _best(loop(False), "sun4v")
    empty, _ = _best(loop(True), "sun4v")
    calls = full_result.events["hypercall"]["cpu_myid"]
    lines = [f"popek bench sun4v ({n:,} fast traps; wall times of this Python model on this host; cycles on "
             f"profile {PROFILE}, whose sun4v prices are assumed)",
             f"  one fast trap (cpu_myid: int 0x80 -> function table -> return)  "
             f"{(full - empty) / calls * 1e6:8.2f} µs",
             "", "  monitor entries per sample guest (each monitor on its platform's build: -D PV for pv, "
             "-D SUN4V for sun4v)",
             f"  {'guest':18} " + " ".join(f"{m:>8}" for m in MONITORS) + "   sun4v kinds"]
    builds = {m: platform_defines(m) for m in MONITORS}
    cycles = []
    for name in GUESTS:
        path = str(SAMPLES / "guests" / f"{name}.s")
        native = _best(load_guest(path), "native", 1)[1]
        row = {}
        for monitor, defines in builds.items():
            result = _best(load_guest(path, defines=defines or None), monitor, 1)[1]
            same = result.exit.code == native.exit.code and result.exit.reason in ("exit-port", "mach-exit")
            row[monitor] = (monitor_entries(result.events), same, result)
        s4 = row["sun4v"][2]
        kinds = ", ".join(f"{k} {sum(s4.events.get(k, {}).values())}" for k in ("hypercall", "hypertrap")
                          if s4.events.get(k)) or "-"
        lines.append(f"  {name:18} " + " ".join(f"{row[m][0]:>7,}{'' if row[m][1] else '*'}" for m in MONITORS)
                     + f"   {kinds}")
        cycles.append((name, native.modelled_cycles, s4.modelled_cycles))
    lines.append("  (* the exit code differs from the native build's: the technique diverges on this guest)")
    lines += ["", f"  nanobenchmarks under sun4v (samples/nanobench -D SUN4V, N = 1000): per operation",
              f"  {'bench':10} {'entries':>8} {'µs':>8} {'cycles':>8}"]
    for name in NANO:
        path = str(SAMPLES / "nanobench" / f"{name}.s")
        op_wall, op = _best(load_guest(path, defines={"SUN4V": 1}), "sun4v")
        empty_wall, none = _best(load_guest(path, defines={"SUN4V": 1, "EMPTY": 1}), "sun4v")
        ok = op.exit.reason == "mach-exit" and op.exit.code == 0
        lines.append(f"  {name:10} {(monitor_entries(op.events) - monitor_entries(none.events)) / 1000:8.2f} "
                     f"{(op_wall - empty_wall) / 1000 * 1e6:8.2f} "
                     f"{(op.modelled_cycles - none.modelled_cycles) / 1000:8.0f}{'' if ok else '  (did not end cleanly)'}")
    lines.append("  (in: no sun4v column: COM1 is hyperprivileged, each in a #GP; a sun4v kernel reads its console "
                 "with cons_getchar)")
    lines += ["", f"  the sun4v column of popek compare on {PROFILE}: modelled cycles",
              f"  {'guest':18} {'native':>10} {'sun4v':>10} {'x native':>9}"]
    for name, a, b in cycles:
        lines.append(f"  {name:18} {a:>10,} {b:>10,} {b / a:>9.2f}")
    lines.append("  (the ported builds print through one cons_write per string where the native builds write "
                 "each byte to COM1, which the profile prices as a real device access)")
    return "\n".join(lines)
