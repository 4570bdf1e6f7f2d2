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
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent.parent / "samples"
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


def _best_wall(guest, monitor: str, runs: int = 3) -> tuple[float, object]:
    from popek.monitors import run_guest
    results = [run_guest(guest, monitor=monitor) for _ in range(runs)]
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
        defines = {"PV": 1, **({"EMPTY": 1} if empty else {})}
        program = assemble_text(HYPERCALL_LOOP.format(n=n), defines=defines,
                                include_dirs=(str(SAMPLES / "guests"),))
        return Guest("hypercalls", ((program.origin, bytes(program.image)),), program.entry, "asm")

    full, full_result = _best_wall(loop(False), "pv")
    empty, _ = _best_wall(loop(True), "pv")
    calls = full_result.events["hypercall"]["xen_version"]
    lines = [f"popek bench pv ({n:,} hypercalls; wall times of this Python model on this host)",
             f"  one hypercall (xen_version, int 0x82 -> table -> return)  {(full - empty) / calls * 1e6:8.2f} µs",
             "", "  monitor entries per ported guest (trap, bt: the native build; pv: its -D PV build)",
             f"  {'guest':18} {'trap':>8} {'bt':>8} {'pv':>8}   pv kinds"]
    builds = {m: platform_defines(m) for m in ("trap", "bt", "pv")}
    for name in PORTED:
        path = str(SAMPLES / "guests" / f"{name}.s")
        native = _best_wall(load_guest(path), "native", 1)[1]
        row = {}
        for monitor, defines in builds.items():
            result = _best_wall(load_guest(path, defines=defines or None), monitor, 1)[1]
            same = result.exit == native.exit     # these guests' exit codes are their own verdicts
            row[monitor] = (monitor_entries(result.events), same, result.events)
        kinds = ", ".join(f"{k} {sum(row['pv'][2].get(k, {}).values())}" for k in ("hypercall", "upcall", "trap",
                                                                                   "direct-trap")
                          if row["pv"][2].get(k))
        cells = " ".join(f"{row[m][0]:>7,}{'' if row[m][1] else '*'}" for m in builds)
        lines.append(f"  {name:18} {cells}   {kinds}")
    lines.append("  (* the exit code differs from the native build's: the technique diverges on this guest)")
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
