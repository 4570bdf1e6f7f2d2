"""`popek bench hvm`: VM exits by reason, and what they cost, under the ``kvm`` and ``vtx-2005`` control sets.

1. Every sample guest (samples/guests/*.s): exits by reason, shadow-paging work and modelled cycles per
   control set, against the native run's cycles.
2. Every nanobenchmark (samples/nanobench, ``popek.experiments.nanobench``: op build - EMPTY build, per
   iteration): exits by reason and modelled cycles per control set, next to bt's cycles and the paper's
   hardware VMM figure.
3. Adams & Agesen's result for first-generation hardware (``vtx-2005``: no nested paging) against binary
   translation: it loses on ``in``, ``pgfault`` and ``ptemod`` and wins on ``syscall`` — judged on this
   run's numbers, with the events of both sides where the model disagrees.
Cycles are modelled (``popek.cost``, default profile p4-2006, the paper's machine), not wall time.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from popek.experiments import nanobench

SAMPLES = Path(__file__).resolve().parent.parent.parent.parent / "samples" / "guests"
CONTROL_SETS = ("kvm", "vtx-2005")
FIRST_GENERATION = "vtx-2005"
# Adams & Agesen, ASPLOS 2006, §6: the first-generation hardware VMM against the software VMM (bt).
PAPER_RESULT = (("in", "loses"), ("pgfault", "loses"), ("ptemod", "loses"), ("syscall", "wins"))


def arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--iterations", "-n", type=int, default=1000, help="N of the nanobenchmarks (default 1000)")
    b.add_argument("--profile", default=nanobench.DEFAULT_PROFILE,
                   help=f"cost profile (default {nanobench.DEFAULT_PROFILE}, the paper's machine)")


def _reasons(names: dict, per: float = 1.0) -> str:
    parts = sorted(names.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{name} {count / per:,.4g}" for name, count in parts) or "none"


def run(args: argparse.Namespace) -> str:
    from popek.cost import load as load_profile
    from popek.errors import UsageError
    from popek.machine.guest import load_guest
    from popek.monitors import run_guest

    if args.iterations < 1:
        raise UsageError("--iterations must be at least 1")
    profile = load_profile(args.profile)
    lines = [f"popek bench hvm: VM exits by reason and modelled cycles on profile {profile.name} ({profile.processor})",
             "", "  sample guests (samples/guests): exits by reason, shadow work, modelled cycles (x native)"]
    for path in sorted(SAMPLES.glob("*.s")):
        guest = load_guest(str(path))
        native = run_guest(guest, "native", profile=profile)
        lines.append(f"  {path.stem:18} native {native.modelled_cycles:>12,} cycles")
        for controls in CONTROL_SETS:
            r = run_guest(guest, "hvm", profile=profile, controls=controls)
            exits = r.events.get("exit", {})
            shadow = r.events.get("shadow", {})
            same = (r.exit, r.console) == (native.exit, native.console)
            ratio = r.modelled_cycles / native.modelled_cycles if native.modelled_cycles else float("nan")
            lines.append(f"    {controls:10} {sum(exits.values()):>7,} exits {r.modelled_cycles:>12,} cycles "
                         f"(x{ratio:,.2f}){'' if same else '  ENDS DIFFERENTLY: ' + r.exit.reason}: "
                         f"{_reasons(exits)}" + (f"; shadow {_reasons(shadow)}" if shadow else ""))

    columns = {c.label: c for c in nanobench.columns()}
    wanted = [f"hvm:{c}" for c in CONTROL_SETS] + [nanobench.ROLES["software"]]
    table = {(b, label): nanobench.measure(b, columns[label], args.iterations, profile)
             for b in nanobench.benches() for label in wanted}
    lines += ["", f"  nanobenchmarks (samples/nanobench, N = {args.iterations:,}): per iteration, op build - EMPTY build",
              f"  {'bench':8} {'control set':12} {'cycles':>9} {'bt cycles':>10} {'paper hw':>9}   exits"]
    for bench in nanobench.benches():
        bt = table[(bench, nanobench.ROLES["software"])]
        paper = nanobench.PAPER.get(bench)
        for controls in CONTROL_SETS:
            m = table[(bench, f"hvm:{controls}")]
            if m.cycles is None:
                lines.append(f"  {bench:8} {controls:12} n/a: {m.missing}")
                continue
            lines.append(f"  {bench:8} {controls:12} {m.cycles:>9,.0f} {_cycles(bt):>10} "
                         f"{paper[2].text if paper else '':>9}   {_reasons(m.events.get('exit', {}))}"
                         + (f"; shadow {_reasons(m.events['shadow'])}" if m.events.get("shadow") else ""))

    lines += ["", f"  Adams & Agesen: first-generation hardware ({FIRST_GENERATION}) against binary translation (bt)"]
    agree = 0
    for bench, paper_says in PAPER_RESULT:
        hw, bt = table.get((bench, f"hvm:{FIRST_GENERATION}")), table.get((bench, nanobench.ROLES["software"]))
        if hw is None or bt is None or hw.cycles is None or bt.cycles is None:
            lines.append(f"  {bench:8} paper: hardware {paper_says}   not measured")
            continue
        rel = nanobench.relation(hw.cycles, bt.cycles)
        model_says = {"<": "wins", ">": "loses", "~": "ties"}[rel]
        agree += model_says == paper_says
        line = (f"  {bench:8} paper: hardware {paper_says:5}  model: {model_says:5} "
                f"({hw.cycles:,.0f} vs bt {bt.cycles:,.0f})  {'yes' if model_says == paper_says else 'NO'}")
        if model_says != paper_says:
            line += f"\n           per iteration  hvm: {hw.event_text()}\n                          bt: {bt.event_text()}"
        lines.append(line)
    lines.append(f"  the model reproduces {agree} of {len(PAPER_RESULT)} (docs/nanobench.md: where and why it does not)")
    return "\n".join(lines)


def _cycles(m) -> str:
    return "n/a" if m.cycles is None else f"{m.cycles:,.0f}"
