"""`popek compare GUEST...`: the same guests on the bare machine and under every monitor, side by side.

For each (guest, monitor): did it compute the same thing as the bare machine (console output, exit and the
state the guest can see), how many guest instructions ran, what the monitor did (traps, callouts,
translations — the monitor's own event kinds, summed), and the wall time. Wall times are of this Python
model on this host, not of real hardware: the ratios between monitors are what they show.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from popek.monitors.base import DEFAULT_BUDGET
from popek.textout import console, emit

MONITORS = ("native", "trap", "bt", "emulate")
# Event kinds that say what a monitor did (the devices' own counts, "io", "timer", are the same everywhere).
_WORK = ("trap", "emulate", "callout", "translate", "chain", "lookup", "invalidate", "flush", "interpret")


@dataclass(frozen=True)
class Cell:
    guest: str
    monitor: str
    exit: str
    equivalent: bool | None      # None for native itself
    instructions: int
    work: dict[str, int]
    wall: float

    def to_dict(self) -> dict:
        return {"guest": self.guest, "monitor": self.monitor, "exit": self.exit, "equivalent": self.equivalent,
                "guest_instructions": self.instructions, "monitor_events": self.work, "wall_seconds": self.wall}


def _work(events: dict) -> dict[str, int]:
    return {kind: sum(names.values()) for kind, names in events.items() if kind.startswith(_WORK)}


def compare(guests: list[str], monitors: tuple[str, ...] = MONITORS, max_instructions: int = DEFAULT_BUDGET) -> list[Cell]:
    from popek.machine.guest import Guest, load_guest
    from popek.monitors import run_guest

    cells = []
    for path in guests:
        guest = path if isinstance(path, Guest) else load_guest(path)
        reference = None
        for monitor in monitors:
            result = run_guest(guest, monitor=monitor, max_instructions=max_instructions).to_dict()
            seen = (result["console"], result["exit"], result["state"])
            if reference is None:
                reference = seen
            exit_text = f"{result['exit']['reason']} {result['exit']['code'] if result['exit']['code'] is not None else ''}"
            cells.append(Cell(guest.name, monitor, exit_text.strip(), None if monitor == monitors[0] else seen == reference,
                              result["guest_instructions"], _work(result["events"]), result["wall_seconds"]))
    return cells


def render_text(cells: list[Cell]) -> str:
    from rich.table import Table

    con, buf = console()
    table = Table(show_edge=False, pad_edge=False, box=None)
    for col in ("guest", "monitor", "same as native", "exit", "guest insns", "monitor work", "wall s", "x native"):
        table.add_column(col, no_wrap=col != "monitor work", overflow="fold")
    native_wall: dict[str, float] = {}
    for c in cells:
        native_wall.setdefault(c.guest, c.wall)
        same = "reference" if c.equivalent is None else ("yes" if c.equivalent else "DIVERGES")
        work = ", ".join(f"{k} {v}" for k, v in sorted(c.work.items())) or "-"
        ratio = c.wall / native_wall[c.guest] if native_wall[c.guest] else float("nan")
        table.add_row(c.guest, c.monitor, same, c.exit, f"{c.instructions:,}", work, f"{c.wall:.3f}", f"{ratio:.1f}")
    con.print(table)
    con.print("same as native: console output, exit and visible state equal to the bare machine's. "
              "wall/x native: this Python model on this host, not real hardware.")
    return buf.getvalue()


def plot(cells: list[Cell], path: str) -> None:
    """Two panels: wall time relative to native (log scale) and the monitor's work, per guest and monitor.
    A diverging run is drawn hatched in red: fast but wrong."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    guests = list(dict.fromkeys(c.guest for c in cells))
    monitors = list(dict.fromkeys(c.monitor for c in cells))
    by = {(c.guest, c.monitor): c for c in cells}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    width = 0.8 / len(monitors)
    for i, monitor in enumerate(monitors):
        xs, ratios, work, wrong = [], [], [], []
        for g, guest in enumerate(guests):
            c = by.get((guest, monitor))
            if c is None:
                continue
            native = by[(guest, monitors[0])].wall or 1e-9
            xs.append(g + (i - (len(monitors) - 1) / 2) * width)
            ratios.append(max(c.wall / native, 1e-3))
            work.append(sum(c.work.values()))
            wrong.append(c.equivalent is False)
        for ax, values in ((top, ratios), (bottom, work)):
            bars = ax.bar(xs, values, width, label=monitor)
            for bar, bad in zip(bars, wrong):
                if bad:
                    bar.set_hatch("//")
                    bar.set_edgecolor("red")
    top.set_yscale("log")
    top.set_ylabel("wall time / native")
    top.set_title("popek compare: the same guests under each monitor (hatched red: diverges from native)")
    top.legend(ncol=len(monitors))
    bottom.set_yscale("symlog")
    bottom.set_ylabel("monitor events (traps, callouts, ...)")
    bottom.set_xticks(range(len(guests)), guests, rotation=20)
    fig.text(0.01, 0.005, "Wall times of this Python model on one host, not of real hardware.", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_table(samples: Path) -> str:
    guests = [str(samples / "guests" / g) for g in ("timer.s", "store_tables.s", "flags.s", "kernel.s")]
    return render_text(compare(guests, ("native", "trap", "bt")))


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("guests", nargs="+", metavar="GUEST", help="flat images, ELF32 files or popek asm sources")
    p.add_argument("--monitors", default=",".join(MONITORS), help=f"comma-separated (default {','.join(MONITORS)})")
    from popek import arguments
    from popek.monitors.base import DEFAULT_BUDGET
    p.add_argument("--max-instructions", type=arguments.budget, default=DEFAULT_BUDGET, metavar="N",
                   help=f"instruction budget of each run (default {DEFAULT_BUDGET:,})")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--plot", metavar="PNG", type=arguments.output_file(".png", ".svg", ".pdf"),
                   help="also draw the comparison as a picture (.png, .svg or .pdf)")


def run(args: argparse.Namespace) -> int:
    monitors = tuple(m.strip() for m in args.monitors.split(",") if m.strip())
    cells = compare(args.guests, monitors, args.max_instructions)
    emit(json.dumps([c.to_dict() for c in cells], indent=2) if args.format == "json" else render_text(cells))
    if args.plot:
        plot(cells, args.plot)
    return 0 if all(c.equivalent is not False for c in cells) else 1
