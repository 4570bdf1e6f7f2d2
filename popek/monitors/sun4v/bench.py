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
    from popek.arguments import count
    b.add_argument("--iterations", type=count, default=20_000, help="fast traps in the timed loop (default 20000)")


def run(args: argparse.Namespace) -> str:
    from popek.events import monitor_entries
    from popek.machine.guest import load_guest
    from popek.monitors.platform_bench import SAMPLES, best_of, entries_table, per_call_us

    n = args.iterations
    one, _ = per_call_us(FAST_TRAP_LOOP, n, "sun4v", {"SUN4V": 1}, "hypercall", "cpu_myid", PROFILE)
    table, rows = entries_table(GUESTS, MONITORS, "sun4v", ("hypercall", "hypertrap"), PROFILE)
    lines = [f"popek bench sun4v ({n:,} fast traps; wall times of this Python model on this host; cycles on "
             f"profile {PROFILE}, whose sun4v prices are assumed)",
             f"  one fast trap (cpu_myid: int 0x80 -> function table -> return)  {one:8.2f} µs",
             "", "  monitor entries per sample guest (each monitor on its platform's build: -D PV for pv, "
             "-D SUN4V for sun4v)", *table]
    cycles = [(r.guest, r.native.modelled_cycles, r.results["sun4v"].modelled_cycles) for r in rows]
    lines += ["", "  nanobenchmarks under sun4v (samples/nanobench -D SUN4V, N = 1000): per operation",
              f"  {'bench':10} {'entries':>8} {'µs':>8} {'cycles':>8}"]
    for name in NANO:
        path = str(SAMPLES / "nanobench" / f"{name}.s")
        op_wall, op = best_of(load_guest(path, defines={"SUN4V": 1}), "sun4v", profile=PROFILE)
        empty_wall, none = best_of(load_guest(path, defines={"SUN4V": 1, "EMPTY": 1}), "sun4v", profile=PROFILE)
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
