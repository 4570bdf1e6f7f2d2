"""`popek bench nano`: the nanobenchmarks of Adams & Agesen (ASPLOS 2006, §6) under every monitor, in
modelled cycles, next to the paper's native / software VMM / hardware VMM figures.

A nanobenchmark (samples/nanobench/NAME.s) is a loop of N iterations around one operation; the same source
built with -D EMPTY is its empty-loop twin, so that one operation costs

    (modelled cycles of the op build - modelled cycles of the EMPTY build) / N

and likewise for every event count. The columns are the monitor registry's (``popek.monitors.MONITORS``),
each monitor once, or once per configuration in ``VARIANTS`` (hvm: the ``kvm`` and ``vtx-2005`` control
sets); a monitor registered later gets its column without a change here. A monitor whose guests are ported
(``platform_defines``: pv's -D PV) runs the platform build of the nanobenchmarks written with the platform
layer (their source calls ``plat_setup``, samples/guests/platform.inc); the others have no build for it.

The paper's orderings (which technique is cheaper for which operation) are data (``ORDERINGS``, from the
paper's text); whether the model reproduces each is decided on this run's numbers, with software VMM = bt
and hardware VMM = hvm under ``vtx-2005`` (first-generation VT-x, no nested paging: the paper's machine).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from popek.errors import UsageError

NANOBENCH = Path(__file__).resolve().parent.parent.parent / "samples" / "nanobench"
ORDER = ("syscall", "in", "crwr", "callret", "pgfault", "divzero", "ptemod")   # the paper's order
DEFAULT_PROFILE = "p4-2006"
OK_EXIT = ("exit-port", 0)

# Monitors measured under more than one configuration: (label, monitor options).
VARIANTS: dict[str, tuple[tuple[str, dict], ...]] = {
    "hvm": (("kvm", {"controls": "kvm"}), ("vtx-2005", {"controls": "vtx-2005"})),
}
# The paper's three columns, as popek's columns.
ROLES = {"native": "native", "software": "bt", "hardware": "hvm:vtx-2005"}

SOURCE = ("cycles on a Pentium 4 672 from Adams & Agesen, ASPLOS 2006, §6 (the nanobenchmark paragraphs; read as "
          "quoted verbatim in ligurio/openbsd-tests tests/atomics/at_vmm.cc) [checked]; Fig. 4 itself not read")


@dataclass(frozen=True)
class Figure:
    """One cell of the paper's table: as printed here, and in cycles where the text gives a number."""
    text: str
    cycles: float | None = None


# What the paper's text says, per nanobenchmark (native, software VMM, hardware VMM), in cycles on the
# Pentium 4 672. "~" marks a number the text gives as a ratio; "-" one the text does not give.
PAPER: dict[str, tuple[Figure, Figure, Figure]] = {
    "syscall": (Figure("-"), Figure("native+~2000"), Figure("= native")),       # "approximately 2000 more"
    "in": (Figure("3209", 3209), Figure("~214", 3209 / 15), Figure("15826", 15826)),  # "fifteen times faster"
    "crwr": (Figure("~140", 140), Figure("35", 35), Figure("~ native")),        # cr8wr: "about four times faster"
    "callret": (Figure("11", 11), Figure("51", 51), Figure("11", 11)),
    "pgfault": (Figure("1093", 1093), Figure("3927", 3927), Figure("11242", 11242)),
    "divzero": (Figure("889", 889), Figure("3223", 3223), Figure("1014", 1014)),
    "ptemod": (Figure("1", 1), Figure("391", 391), Figure("12733", 12733)),    # "the native single cycle store"
}

# The paper's qualitative results: (cheaper-or-equal role, relation, role). "<": clearly cheaper; "~": about
# the same (see ``relation``).
ORDERINGS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "syscall": (("hardware", "~", "native"), ("native", "<", "software")),
    "in": (("software", "<", "native"), ("native", "<", "hardware")),
    "crwr": (("software", "<", "native"), ("hardware", "~", "native")),
    "callret": (("hardware", "~", "native"), ("native", "<", "software")),
    "pgfault": (("native", "<", "software"), ("software", "<", "hardware")),
    "divzero": (("hardware", "~", "native"), ("hardware", "<", "software")),
    "ptemod": (("native", "<", "software"), ("software", "<", "hardware")),
}
SLACK_CYCLES, SLACK_SHARE = 10.0, 0.25     # "about the same": within 10 cycles or 25 % of the larger


def relation(a: float, b: float) -> str:
    """'~' when a and b are about the same, else '<' or '>'."""
    if abs(a - b) <= max(SLACK_CYCLES, SLACK_SHARE * max(a, b)):
        return "~"
    return "<" if a < b else ">"


@dataclass(frozen=True)
class Column:
    label: str              # as the table heads it: "bt", "hvm:vtx-2005"
    monitor: str
    options: dict = field(default_factory=dict)


def columns() -> list[Column]:
    """Every monitor of the registry, once per configuration."""
    from popek.monitors import MONITORS
    return [Column(name if label is None else f"{name}:{label}", name, dict(opts))
            for name in MONITORS for label, opts in VARIANTS.get(name, ((None, {}),))]


def benches() -> list[str]:
    """The nanobenchmarks in samples/nanobench, in the paper's order (others after, by name)."""
    found = sorted(p.stem for p in NANOBENCH.glob("*.s"))
    return [b for b in ORDER if b in found] + [b for b in found if b not in ORDER]


def ported(bench: str) -> bool:
    """Whether the nanobenchmark is written with the platform layer, and so has ported builds."""
    return re.search(r"^\s*plat_setup\b", (NANOBENCH / f"{bench}.s").read_text(), re.M) is not None


@dataclass
class Measurement:
    """One nanobenchmark under one column: per-iteration differences between the op and EMPTY builds."""
    bench: str
    column: str
    cycles: float | None = None                 # modelled cycles per iteration
    instructions: float = 0.0                   # guest instructions per iteration
    events: dict[str, dict[str, float]] = field(default_factory=dict)   # kind -> name -> per iteration
    wall_us: float = 0.0                        # µs per iteration of this Python model (best of ``repeat``)
    fitted: bool = False                        # a price of the difference comes from this very figure
    missing: str | None = None                  # why there is no number

    def event_text(self) -> str:
        """The events that cost something (not the ``info`` bookkeeping), per iteration."""
        from popek.events import INFO, KINDS
        parts = [f"{kind} {name} {n:g}" for kind, names in sorted(self.events.items()) for name, n in
                 sorted(names.items()) if KINDS[kind].role_of(name) != INFO]
        return ", ".join(parts) or "-"


def measure(bench: str, column: Column, n: int, profile, repeat: int = 1) -> Measurement:
    """Run ``bench`` and its EMPTY twin (N = ``n``) under ``column``, priced on ``profile`` (a loaded
    Profile); a build or run that fails gives a Measurement with ``missing`` set, never an exception."""
    from popek.errors import PopekError

    out = Measurement(bench, column.label)
    try:
        runs = _runs(bench, column, n, profile, repeat)
    except PopekError as exc:           # a monitor that cannot take this guest: say so in its cell
        out.missing = f"{column.label}: {exc}"
        return out
    except Exception as exc:            # a monitor that breaks: the table still prints, and says so
        out.missing = f"{column.label} failed: {type(exc).__name__}: {exc}"
        return out
    if isinstance(runs, str):
        out.missing = runs
        return out
    (op, op_wall), (none, none_wall) = runs
    out.cycles = (op.extra["cost"].cycles - none.extra["cost"].cycles) / n
    out.instructions = (op.guest_instructions - none.guest_instructions) / n
    out.wall_us = (op_wall - none_wall) / n * 1e6
    for kind in sorted(set(op.events) | set(none.events)):
        for name in sorted(set(op.events.get(kind, {})) | set(none.events.get(kind, {}))):
            d = op.events.get(kind, {}).get(name, 0) - none.events.get(kind, {}).get(name, 0)
            if d:
                out.events.setdefault(kind, {})[name] = d / n
    out.fitted = _fitted(bench, out.events, profile)
    return out


def _runs(bench: str, column: Column, n: int, profile, repeat: int):
    """[(op result, best wall), (EMPTY result, best wall)], or why there is none (a string)."""
    from popek.machine.guest import load_guest
    from popek.monitors import platform_defines, run_guest

    platform = platform_defines(column.monitor)
    if platform and not ported(bench):
        return f"no {'/'.join(platform)} build (written for the bare machine, not the platform layer)"
    runs = []
    for empty in (False, True):
        guest = load_guest(str(NANOBENCH / f"{bench}.s"), defines={**platform, "N": n, **({"EMPTY": 1} if empty else {})})
        results = [run_guest(guest, column.monitor, profile=profile, **column.options) for _ in range(repeat)]
        first = results[0]
        if (first.exit.reason, first.exit.code) != OK_EXIT:
            return f"{column.label}: {'EMPTY build ' if empty else ''}ended {first.exit.reason}: {first.exit.why}".rstrip(": ")
        runs.append((first, min(r.wall_seconds for r in results)))
    return runs


def _fitted(bench: str, events: dict[str, dict[str, float]], profile) -> bool:
    """Whether a price behind one of the per-iteration events names this nanobenchmark as its source (the
    profile is calibrated on that figure, so agreeing with it says nothing about the model)."""
    from popek.cost.model import prices_of
    mark = f"nanobenchmark `{bench}`"
    return any(mark in p.provenance for kind, names in events.items() for name in names
               for p in (prices_of(kind, name, profile) or ()))


@dataclass
class Ordering:
    bench: str
    left: str
    relation: str
    right: str
    model: str | None           # the model's relation between the two columns (None: a number is missing)
    left_cycles: float | None
    right_cycles: float | None

    @property
    def reproduced(self) -> bool | None:
        return None if self.model is None else self.model == self.relation


def orderings(table: dict[tuple[str, str], Measurement]) -> list[Ordering]:
    """Each of the paper's orderings, judged on the model's numbers of this run."""
    out = []
    measured = {bench for bench, _ in table}
    for bench, relations in ORDERINGS.items():
        if bench not in measured:
            continue
        for left, rel, right in relations:
            a, b = (table.get((bench, ROLES[role])) for role in (left, right))
            if a is None or b is None or a.cycles is None or b.cycles is None:
                out.append(Ordering(bench, left, rel, right, None, None, None))
                continue
            out.append(Ordering(bench, left, rel, right, relation(a.cycles, b.cycles), a.cycles, b.cycles))
    return out


@dataclass
class NanoReport:
    profile: str
    processor: str
    n: int
    columns: list[Column]
    benches: list[str]
    table: dict[tuple[str, str], Measurement]

    def render(self) -> str:
        width = max(9, *(len(c.label) + 1 for c in self.columns))
        lines = [f"popek bench nano: modelled cycles per iteration on profile {self.profile} ({self.processor}), "
                 f"N = {self.n:,}, (op build - EMPTY build) / N",
                 f"  {'bench':8} " + "".join(f"{c.label:>{width}}" for c in self.columns)
                 + "  |" + "".join(f"{h:>13}" for h in ("paper native", "software", "hardware"))]
        notes: dict[str, int] = {}
        for bench in self.benches:
            cells = []
            for c in self.columns:
                m = self.table[(bench, c.label)]
                if m.cycles is None:
                    mark = notes.setdefault(m.missing, len(notes) + 1)
                    cells.append(f"{'n/a[' + str(mark) + ']':>{width}}")
                else:
                    cells.append(f"{m.cycles:>{width - 1},.0f}{'*' if m.fitted else ' '}")
            paper = PAPER.get(bench)
            tail = ("  |" + "".join(f"{f.text:>13}" for f in paper)) if paper else ""
            lines.append(f"  {bench:8} " + "".join(cells) + tail)
        lines.append(f"  * a price behind this number is taken from this nanobenchmark's own figure in the paper "
                     f"(`popek profiles {self.profile}`): agreement there is by construction")
        for text, mark in notes.items():
            lines.append(f"  [{mark}] {text}")
        lines.append(f"  paper: {SOURCE}")
        lines += ["", f"  the paper's orderings, judged on this run (software VMM = {ROLES['software']}, hardware VMM "
                      f"= {ROLES['hardware']}; '~': within {SLACK_CYCLES:.0f} cycles or {SLACK_SHARE:.0%})"]
        judged = orderings(self.table)
        for o in judged:
            claim = f"{o.left} {o.relation} {o.right}"
            if o.model is None:
                verdict = "not measured"
            else:
                verdict = (f"{'yes' if o.reproduced else 'NO '}  model: {o.left} {o.left_cycles:,.0f} {o.model} "
                           f"{o.right} {o.right_cycles:,.0f}")
            lines.append(f"  {o.bench:8} {claim:24} {verdict}")
        decided = [o for o in judged if o.model is not None]
        lines.append(f"  reproduced {sum(1 for o in decided if o.reproduced)} of {len(decided)} orderings"
                     + (f" ({len(judged) - len(decided)} not measured)" if len(decided) < len(judged) else "")
                     + " (docs/nanobench.md: where the model disagrees, and why)")
        lines += ["", "  per iteration, the events that differ between the op and EMPTY builds:"]
        for bench in self.benches:
            for c in self.columns:
                m = self.table[(bench, c.label)]
                if m.cycles is not None:
                    lines.append(f"  {bench:8} {c.label:{width}} insns {m.instructions:g}; "
                                 f"{m.event_text()}")
        lines.append("  (modelled cycles: the model counts events exactly and prices them from the profile; it does "
                     "not model caches, pipelines or the indirect costs of exits)")
        return "\n".join(lines)


def nano(n: int = 1000, profile: str = DEFAULT_PROFILE, only: tuple[str, ...] | None = None) -> NanoReport:
    """Measure every nanobenchmark (or ``only`` those) under every column."""
    from popek.cost import load as load_profile
    if n < 1:
        raise UsageError("--iterations must be at least 1")
    priced = load_profile(profile)
    names = benches()
    if only:
        unknown = [b for b in only if b not in names]
        if unknown:
            raise UsageError(f"unknown nanobenchmark {unknown[0]!r} (known: {', '.join(names)})")
        names = [b for b in names if b in only]
    cols = columns()
    table = {(b, c.label): measure(b, c, n, priced) for b in names for c in cols}
    return NanoReport(priced.name, priced.processor, n, cols, names, table)


def arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--iterations", "-n", type=int, default=1000, help="N, iterations of each loop (default 1000)")
    b.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"cost profile (name or .toml file; default {DEFAULT_PROFILE}, the paper's machine)")
    b.add_argument("--bench", action="append", default=None, metavar="NAME",
                   help="only this nanobenchmark (repeatable; default all)")


def run(args: argparse.Namespace) -> str:
    return nano(args.iterations, args.profile, tuple(args.bench) if args.bench else None).render()
