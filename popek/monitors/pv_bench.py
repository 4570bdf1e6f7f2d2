"""`popek bench pv`: what paravirtualization costs and buys, measured in one run.

- µs per hypercall of the model: a loop of N ``xen_version`` hypercalls against its empty twin (the same
  loop without the ``int 0x82``), best of three, divided by N;
- monitor entries (``popek.events.monitor_entries``: traps, callouts, hypercalls, software deliveries,
  upcalls) per ported guest under trap and bt (the native build) and pv (the ``-D PV`` build), with
  whether each ended with the native build's exit code (each of these guests encodes its own checks in it);
- the nanobenchmarks with a PV build (samples/nanobench: those written with the platform layer): entries,
  µs and modelled cycles per operation per monitor, measured by ``popek.experiments.nanobench.measure``.
Wall times are this Python model's on this host, not real hardware's.
"""
from __future__ import annotations

import argparse

PORTED = ("hello", "timer", "syscall", "kernel", "critical_section")
HYPERCALL_LOOP = """
        .include "pm.inc"
_start:
        plat_setup
        mov edi, {n}
again:
        .ifndef EMPTY
        mov eax, HYPERVISOR_xen_version
        xor ebx, ebx
        int 0x82
        .endif
        dec edi
        jnz again
        exit 0
        pm_data
"""


def arguments(b: argparse.ArgumentParser) -> None:
    from popek.arguments import count
    b.add_argument("--iterations", type=count, default=20_000, help="hypercalls in the timed loop (default 20000)")


def run(args: argparse.Namespace) -> str:
    from popek.events import monitor_entries
    from popek.monitors.platform_bench import entries_table, per_call_us

    n = args.iterations
    one, _ = per_call_us(HYPERCALL_LOOP, n, "pv", {"PV": 1}, "hypercall", "xen_version")
    builds = ("trap", "bt", "pv")
    table, _ = entries_table(PORTED, builds, "pv", ("hypercall", "upcall", "trap", "direct-trap"))
    lines = [f"popek bench pv ({n:,} hypercalls; wall times of this Python model on this host)",
             f"  one hypercall (xen_version, int 0x82 -> table -> return)  {one:8.2f} µs",
             "", "  monitor entries per ported guest (trap, bt: the native build; pv: its -D PV build)", *table]
    # The nanobenchmarks that have a PV build, measured as `popek bench nano` measures them.
    from popek.cost import load as load_profile
    from popek.experiments import nanobench
    profile = load_profile(nanobench.DEFAULT_PROFILE)
    columns = {c.label: c for c in nanobench.columns()}
    ported = [b for b in nanobench.benches() if nanobench.ported(b)]
    lines += ["", f"  nanobenchmarks (samples/nanobench, N = 1000): per operation, monitor entries, µs of this model "
                  f"and modelled cycles on {profile.name}",
              f"  {'bench':10} " + " ".join(f"{m + ' entries':>12} {m + ' µs':>9} {m + ' cycles':>11}" for m in builds)]
    for name in ported:
        cells = []
        for monitor in builds:
            m = nanobench.measure(name, columns[monitor], 1000, profile, repeat=3)
            cells.append(f"{'n/a':>12} {'':>9} {'':>11}" if m.cycles is None else
                         f"{monitor_entries(m.events):12.2f} {m.wall_us:9.2f} {m.cycles:11,.0f}")
        lines.append(f"  {name:10} " + " ".join(cells))
    lines.append("  (pv's syscall is a direct trap: no monitor entry, but this model still delivers it in Python;")
    lines.append(f"   {', '.join(b for b in nanobench.benches() if b not in ported)}: no PV build (written for the "
                 "bare machine; PV guests run with paging off); `popek bench nano` has every monitor's column)")
    return "\n".join(lines)
