"""`popek compare GUEST...`: the same guests on the bare machine and under every monitor, on one scale.

For each (guest, monitor): did it compute the same thing as the bare machine (``verdict``), how many guest
instructions ran, what the monitor did (its own event kinds, summed through the vocabulary of
``popek.events``: traps, callouts, translations, exits, hypercalls...), the modelled cycles on a cost profile
(``popek.cost``: the events priced from published numbers or labelled assumptions) and the slowdown against
native in those cycles. Wall time is measured too, and labelled as what it is: this Python model on this
host, not real hardware. Native always runs, as the reference, whatever ``--monitors`` lists. A monitor
whose guests are ported (pv, sun4v) runs its platform's build of an assembly source (the same source with
-D PV or -D SUN4V, ``popek.monitors.platform_defines``); that build is another program, so it is judged on
what it prints and how it exits (sun4v's mach_exit counting as the exit port), not on its machine state.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass, field

from popek.errors import BadInput, UsageError
from popek.tabular import Tabular
from popek.textout import console, emit

REFERENCE = "native"
STATUSES = ("reference", "equivalent", "diverges", "undecided")


@dataclass(frozen=True)
class Cell:
    guest: str
    monitor: str
    exit: str
    status: str                  # STATUSES
    first_difference: str | None  # what differs first, when it diverges (or why it is undecided)
    instructions: int
    work: dict[str, int]         # monitor events by kind (popek.events.monitor_work)
    cycles: int | None           # modelled cycles on the profile
    breakdown: dict[str, float]  # modelled cycles by event kind
    unpriced: list[str]
    slowdown: float | None       # modelled cycles / native's
    wall: float

    @property
    def equivalent(self) -> bool | None:
        return None if self.status == "reference" else self.status == "equivalent"

    def to_dict(self) -> dict:
        return {"guest": self.guest, "monitor": self.monitor, "exit": self.exit, "status": self.status,
                "first_difference": self.first_difference, "guest_instructions": self.instructions,
                "monitor_events": self.work, "modelled_cycles": self.cycles, "cycles_by_kind": self.breakdown,
                "unpriced": self.unpriced, "slowdown": self.slowdown, "wall_seconds": self.wall}


CSV_COLUMNS = ("guest", "monitor", "status", "exit", "guest_instructions", "modelled_cycles", "slowdown",
               "monitor_events", "first_difference", "wall_seconds")


@dataclass
class Comparison(Tabular):
    profile: str
    cells: list[Cell] = field(default_factory=list)

    @property
    def all_equivalent(self) -> bool:
        return all(c.status in ("reference", "equivalent") for c in self.cells)

    def to_dict(self) -> dict:
        return {"schema": 2, "profile": self.profile, "reference": REFERENCE,
                "cells": [c.to_dict() for c in self.cells]}

    def caption(self) -> str:
        return f"modelled cycles on profile {self.profile}; native is the reference"

    def table(self) -> tuple[list[str], list[list]]:
        rows = [[c.guest, c.monitor, c.status, c.exit, c.instructions, c.cycles, c.slowdown,
                 _work_text(c.work), c.first_difference, c.wall] for c in self.cells]
        return list(CSV_COLUMNS), rows

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        columns, rows = self.table()
        writer.writerow(columns)
        writer.writerows(rows)
        return out.getvalue()


def verdict(reference, result, ported: bool = False) -> tuple[str, str | None]:
    """Whether ``result`` computed what ``reference`` (the native run) did: (status, first difference, or
    why it is undecided).

    The one place compare decides equivalence, on popek.experiments.divergence.judge: console output, exit,
    the visible state and guest RAM; a run that did not finish (its budget, Ctrl-C) is undecided, never
    equivalent. A ``ported`` build (pv's -D PV source) is another program: its output and exit are compared,
    not its registers or RAM."""
    from popek.experiments.divergence import UNDECIDED, judge

    found = judge(reference, result, ported=ported)
    if found.status == UNDECIDED:
        return found.status, found.reason
    return found.status, found.differences[0] if found.differences else None


def _work_text(work: dict[str, int], top: int | None = None) -> str:
    """The monitor's events by kind, largest first (``top``: only that many, then how many more kinds)."""
    ranked = sorted(work.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ranked if top is None else ranked[:top]
    text = ", ".join(f"{k} {v:,}" for k, v in shown) or "-"
    return text + (f", +{len(ranked) - len(shown)} kinds" if len(ranked) > len(shown) else "")


def compare(guests, monitors: tuple[str, ...] | None = None, max_instructions: int | None = None,
            profile: str = "modern") -> Comparison:
    """Run every guest (paths or loaded Guests) natively and under ``monitors`` (default: every monitor of
    the registry), priced on ``profile``."""
    from popek.cost import load as load_profile
    from popek.machine.guest import Guest, load_guest
    from popek.machine.guest import SOURCE_SUFFIXES
    from popek.monitors import MONITORS, platform_defines, run_guest
    from popek.monitors.base import DEFAULT_BUDGET

    chosen = tuple(MONITORS) if monitors is None else tuple(monitors)
    if not chosen:
        raise UsageError("give at least one monitor")
    unknown = [m for m in chosen if m not in MONITORS]
    if unknown:
        raise UsageError(f"unknown monitor {unknown[0]!r} (known: {', '.join(MONITORS)})")
    order = (REFERENCE,) + tuple(m for m in dict.fromkeys(chosen) if m != REFERENCE)
    budget = DEFAULT_BUDGET if max_instructions is None else max_instructions
    priced = load_profile(profile)
    comparison = Comparison(priced.name)
    for item in guests:
        builds: dict[tuple, Guest] = {}
        reference = None
        for monitor in order:
            source = not isinstance(item, Guest) and str(item).endswith(SOURCE_SUFFIXES)
            defines = platform_defines(monitor) if source else {}
            key = tuple(sorted(defines.items()))
            if key not in builds:           # a Guest object, or a binary, runs as it is everywhere
                builds[key] = item if isinstance(item, Guest) else load_guest(str(item), defines=defines or None)
            guest = builds[key]
            result = run_guest(guest, monitor=monitor, max_instructions=budget, profile=priced)
            reference = reference or result
            comparison.cells.append(cell(guest.name, result, reference, ported=bool(key)))
    return comparison


def cell(guest: str, result, reference, ported: bool = False) -> Cell:
    """One run's row: ``reference`` is the native run of the same guest (``result`` itself for native);
    ``ported``: the run is of another build of the source (pv's -D PV), judged on its console and exit."""
    from popek.events import monitor_work

    if result is reference:
        status, first = "reference", None
    else:
        status, first = verdict(reference, result, ported=ported)
    cost = result.extra["cost"]
    exit_text = f"{result.exit.reason} {'' if result.exit.code is None else result.exit.code}".strip()
    return Cell(guest, result.monitor, exit_text, status, first, result.guest_instructions,
                monitor_work(result.events), result.modelled_cycles,
                {k: round(v, 1) for k, v in cost.breakdown.items()}, cost.unpriced,
                round(result.modelled_cycles / reference.modelled_cycles, 2) if reference.modelled_cycles else None,
                result.wall_seconds)


def render_text(comparison: Comparison) -> str:
    from rich.table import Table

    con, buf = console(150)            # wide enough that no number is cut
    table = Table(show_edge=False, pad_edge=False, box=None)
    for col in ("guest", "monitor", "same", "exit", "insns", "largest monitor events", "cycles", "x native",
                "wall s"):
        table.add_column(col, no_wrap=True, overflow="ellipsis",
                         justify="right" if col in ("insns", "cycles", "x native", "wall s") else "left")
    shown = {"reference": "reference", "equivalent": "yes", "diverges": "DIVERGES", "undecided": "UNDECIDED"}
    for c in comparison.cells:
        table.add_row(c.guest, c.monitor, shown[c.status], c.exit, f"{c.instructions:,}", _work_text(c.work, 2),
                      f"{c.cycles:,}" if c.cycles is not None else "-",
                      f"{c.slowdown:.1f}" if c.slowdown is not None else "-", f"{c.wall:.3f}")
    con.print(table)
    for c in comparison.cells:
        if c.first_difference:
            con.print(f"{c.guest} under {c.monitor}: {c.status}: {c.first_difference} "
                      f"(popek diff {c.guest} --monitor {c.monitor})")
    if any(c.slowdown is not None and c.slowdown < 1 for c in comparison.cells):
        con.print("x native below 1: on the bare machine every port access reaches a real device (priced by the "
                  "profile's io, e.g. 3,209 cycles for an in on the Pentium 4, Adams & Agesen 2006), while a "
                  "monitor completes it against its device model; an I/O-bound guest can then cost less under a "
                  "monitor, as in the paper's own `in` nanobenchmark.")
    unpriced = sorted({u for c in comparison.cells for u in c.unpriced})
    if unpriced:
        con.print(f"not priced by profile {comparison.profile} (left out of the cycles): {', '.join(unpriced)}")
    con.print(f"same: console output, exit and visible state equal to the bare machine's. cycles: modelled, "
              f"the run's events priced on profile {comparison.profile} (`popek profiles "
              f"{comparison.profile}`: every number with its source, or assumed). wall s: this Python model on "
              f"this host, not real hardware.")
    return buf.getvalue()


def plot(comparison: Comparison, path) -> None:
    """Two panels: the slowdown against native in modelled cycles (log scale), grouped by guest, one bar per
    monitor; and each run's modelled cycles broken down by event kind (stacked, linear, in units of the
    guest's native cycles); ``path`` is a file name or a binary file (PNG). A run that
    diverges or is undecided is drawn hatched, outlined in red and labelled, so it cannot be read as a result."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cells = comparison.cells
    guests = list(dict.fromkeys(c.guest for c in cells))
    monitors = list(dict.fromkeys(c.monitor for c in cells))
    by = {(c.guest, c.monitor): c for c in cells}
    kinds = sorted({k for c in cells for k in c.breakdown}, key=lambda k: -sum(c.breakdown.get(k, 0) for c in cells))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8))
    width = 0.8 / len(monitors)
    colours = plt.get_cmap("tab10")
    for i, monitor in enumerate(monitors):
        for g, guest in enumerate(guests):
            c = by.get((guest, monitor))
            if c is None or c.slowdown is None:
                continue
            x = g + (i - (len(monitors) - 1) / 2) * width
            bad = c.status in ("diverges", "undecided")
            top.bar(x, c.slowdown, width, color=colours(i), label=monitor if g == 0 else None,
                    hatch="//" if bad else None, edgecolor="red" if bad else "none")
            if bad:
                top.annotate(c.status.upper(), (x, c.slowdown), ha="center", va="bottom", fontsize=7,
                             color="red", rotation=90)
    top.set_yscale("log")
    top.set_ylabel(f"modelled cycles / native ({comparison.profile})")
    top.set_xticks(range(len(guests)), guests, rotation=15)
    top.set_title("popek compare: slowdown against the bare machine (hatched red: not the same result)")
    top.legend(ncol=len(monitors), fontsize=8)
    # Stacked parts on a log axis would misstate their shares: the breakdown is linear, in units of the same
    # guest's native cycles, so each bar's height is its slowdown and its segments say where the cycles went.
    native = {c.guest: c.cycles for c in cells if c.status == "reference"}
    labels, bottoms = [], [0.0] * len(cells)
    xs = range(len(cells))
    for k, kind in enumerate(kinds):
        values = [c.breakdown.get(kind, 0.0) / (native.get(c.guest) or 1) for c in cells]
        bottom.bar(xs, values, 0.7, bottom=bottoms, color=plt.get_cmap("tab20")(k % 20), label=kind)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for x, c in zip(xs, cells):
        labels.append(f"{c.guest}\n{c.monitor}" + ("\n(" + c.status + ")" if c.status in ("diverges", "undecided") else ""))
    bottom.set_ylabel("modelled cycles / native's, by event kind")
    bottom.set_xticks(list(xs), labels, fontsize=6, rotation=90)
    bottom.legend(fontsize=6, ncol=4)
    fig.text(0.01, 0.005, f"Events counted exactly by popek; priced on profile {comparison.profile} "
             f"(published numbers where known, otherwise labelled assumptions). Not wall time.", fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise BadInput(f"cannot write the plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


SAMPLE_GUESTS = ("timer.s", "store_tables.s", "flags.s", "kernel.s")


def configure(p: argparse.ArgumentParser) -> None:
    from popek import arguments
    from popek.monitors import MONITORS
    from popek.monitors.base import DEFAULT_BUDGET

    p.add_argument("guests", nargs="+", metavar="GUEST", help="flat images, ELF32 files or popek asm sources")
    p.add_argument("--monitors", type=arguments.monitor_list, default=None, metavar="LIST",
                   help=f"comma-separated monitors (default all: {','.join(MONITORS)}); native always runs as "
                        "the reference")
    p.add_argument("--profile", type=arguments.profile, default="modern", metavar="NAME|FILE",
                   help="cost profile (default modern)")
    p.add_argument("--max-instructions", type=arguments.budget, default=DEFAULT_BUDGET, metavar="N",
                   help=f"instruction budget of each run (default {DEFAULT_BUDGET:,})")
    p.add_argument("--format", choices=("text", "json", "csv"), default="text")
    p.add_argument("--plot", metavar="PNG", type=arguments.output_file(".png", ".svg", ".pdf"),
                   help="also draw the comparison as a picture (.png, .svg or .pdf)")


def run(args: argparse.Namespace) -> int:
    from popek import api
    comparison = api.compare(args.guests, args.monitors, args.profile, max_instructions=args.max_instructions)
    text = {"json": lambda: json.dumps(comparison.to_dict(), indent=2), "csv": comparison.to_csv,
            "text": lambda: render_text(comparison)}[args.format]()
    emit(text)
    if args.plot:
        plot(comparison, args.plot)
    return 0 if comparison.all_equivalent else 1
