"""``popek report GUEST... -o report.html``: one self-contained page to project or to send.

For every guest: the listing of the code that ran, each instruction marked by what each monitor did with it
(ran unchanged, interpreted, translated unchanged (IDENT) or rewritten, callout, trapped and emulated, VM
exit with its reason, hypercall, reflected, leaked), then the comparison table of every run, the plot, and
the divergences with the instructions to blame. The marks come from traced runs
(``popek.experiments.attribution``); what a monitor cannot attribute per instruction is said on the page.

The page needs nothing at view time: the CSS is inline, the plot is a PNG data URI, and the one small
script (click a mark in the legend to highlight its instructions) is inline too and optional.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from popek.errors import BadInput, UsageError

# mark -> (what the legend says, CSS colour). The order is the legend's.
MARKS = {
    "ran": ("ran unchanged on the real CPU", "#e8f5e9"),
    "interpreted": ("interpreted in software, one instruction at a time", "#f1f8e9"),
    "ident": ("translated unchanged (IDENT)", "#e3f2fd"),
    "rewritten": ("translated, rewritten (a branch or return through the monitor's exits and lookups)", "#d1c4e9"),
    "callout": ("callout: the translation calls the monitor's emulation routine", "#fff3e0"),
    "trap": ("trapped to the monitor and emulated", "#ffe0b2"),
    "exit": ("VM exit, with its reason", "#ffccbc"),
    "hypercall": ("hypercall into the hypervisor", "#b2ebf2"),
    "reflect": ("an event the monitor delivered through the guest's virtual IDT", "#f0f4c3"),
    "direct": ("a direct trap into the guest kernel (no hypervisor work)", "#dcedc8"),
    "leaked": ("LEAKED: read the monitor's state, not what the bare machine gave", "#ef9a9a"),
}
# the word a listing cell shows for a mark (the legend explains it)
SHOWN = {"ident": "IDENT", "leaked": "LEAKED"}
# what executing in place means under a monitor (default: the real CPU ran it unchanged)
IN_PLACE = {"emulate": "interpreted"}
# event kinds charged to an instruction -> its mark (the other kinds are details in the cell's title)
ENTRY_MARKS = {"trap": "trap", "emulate": "trap", "hypertrap": "trap", "exit": "exit", "hypercall": "hypercall",
               "reflect": "reflect", "direct-trap": "direct", "callout": "callout"}
LISTING_MAX = 4000          # instructions listed per build; a bigger guest is cut, and the page says so


@dataclass
class Build:
    label: str                  # "native build", "-D PV build"
    guest: object               # popek.machine.Guest
    monitors: list[str] = field(default_factory=list)
    traces: dict = field(default_factory=dict)          # monitor -> attribution.Trace
    results: dict = field(default_factory=dict)         # monitor -> RunResult


@dataclass
class GuestReport:
    name: str
    builds: list[Build]
    divergences: list[dict] = field(default_factory=list)   # {monitor, status, differences, blamed, ported}


@dataclass
class ReportDocument:
    guests: list[GuestReport]
    comparison: object          # compare.Comparison

    def to_html(self) -> str:
        return render_html(self)

    def _repr_html_(self) -> str:
        return self.comparison._repr_html_()


def build(guests, monitors=None, profile: str | None = None, max_instructions: int | None = None) -> ReportDocument:
    """Trace every guest (paths or loaded Guests) natively and under ``monitors`` (default: the registry)."""
    from popek.cost import DEFAULT, load as load_profile
    from popek.experiments import compare, divergence
    from popek.experiments.attribution import traced_run
    from popek.machine.guest import SOURCE_SUFFIXES, Guest, load_guest
    from popek.monitors import MONITORS, platform_defines
    from popek.monitors.base import DEFAULT_BUDGET

    chosen = tuple(MONITORS) if monitors is None else tuple(monitors)
    if not chosen:
        raise UsageError("give at least one monitor")
    unknown = [m for m in chosen if m not in MONITORS]
    if unknown:
        raise UsageError(f"unknown monitor {unknown[0]!r} (known: {', '.join(MONITORS)})")
    if not guests:
        raise UsageError("give at least one guest")
    order = (compare.REFERENCE,) + tuple(m for m in dict.fromkeys(chosen) if m != compare.REFERENCE)
    priced = load_profile(profile or DEFAULT)
    budget = DEFAULT_BUDGET if max_instructions is None else max_instructions
    comparison = compare.Comparison(priced.name)
    reports = []
    for item in guests:
        source = not isinstance(item, Guest) and str(item).endswith(SOURCE_SUFFIXES)
        builds: dict[tuple, Build] = {}
        reference = None
        for monitor in order:
            defines = platform_defines(monitor) if source else {}
            key = tuple(sorted(defines.items()))
            if key not in builds:
                guest = item if isinstance(item, Guest) else load_guest(str(item), defines=defines or None)
                label = "native build" if not key else " ".join(f"-D {k}" for k, _ in key) + " build"
                builds[key] = Build(label, guest)
            b = builds[key]
            result, trace = traced_run(b.guest, monitor, max_instructions=budget, profile=priced)
            b.monitors.append(monitor)
            b.traces[monitor], b.results[monitor] = trace, result
            reference = reference or result
            cell = compare.cell(b.guest.name, result, reference, ported=bool(key))
            comparison.cells.append(cell)
        native_build = builds[()] if () in builds else next(iter(builds.values()))
        report = GuestReport(native_build.guest.name, list(builds.values()))
        native_trace = native_build.traces[compare.REFERENCE]
        for key, b in builds.items():
            for monitor in b.monitors:
                if monitor == compare.REFERENCE:
                    continue
                c = next(c for c in comparison.cells if c.guest == b.guest.name and c.monitor == monitor)
                blamed = [] if key else divergence.blame(native_trace.observations, b.traces[monitor].observations)
                if c.status != "equivalent" or blamed:
                    theirs = b.results[monitor].to_dict()
                    if key:
                        theirs["state"] = reference.to_dict()["state"]
                    report.divergences.append({
                        "monitor": monitor, "status": c.status, "ported": bool(key), "build": b.label,
                        "differences": divergence._differences(reference.to_dict(), theirs) or [c.first_difference],
                        "blamed": blamed})
        reports.append(report)
    return ReportDocument(reports, comparison)


# --- marks ------------------------------------------------------------------------------------------------
def marks_for(build: Build, monitor: str, leaks: dict[int, list[dict]]) -> dict[int, list[tuple[str, str]]]:
    """address -> [(mark, label)] for one monitor's run of one build."""
    trace = build.traces[monitor]
    out: dict[int, list[tuple[str, str]]] = {}
    for address, how in trace.translated.items():
        mark, _, name = how.partition(" ")
        out.setdefault(address, []).append((mark, name))
    for address, counts in trace.entries.items():
        by_mark: dict[str, list[str]] = {}
        for (kind, name), n in sorted(counts.items()):
            mark = ENTRY_MARKS.get(kind)
            if mark and not (kind == "emulate" and ("trap", name) in counts):     # trap lgdt implies its emulation
                by_mark.setdefault(mark, []).append(f"{name} ×{n:,}" if n > 1 else name)
        for mark, names in by_mark.items():
            out.setdefault(address, []).append((mark, ", ".join(names)))
    for address, blamed in leaks.items():
        b = blamed[0]
        more = f" (and {len(blamed) - 1} more executions)" if len(blamed) > 1 else ""
        out.setdefault(address, []).append(("leaked", f"{b['name']} read {b['saw']} (bare machine: {b['native']}){more}"))
    in_place = IN_PLACE.get(monitor, "ran")
    for address, n in trace.executed.items():
        if address not in out:
            out[address] = [(in_place, f"×{n:,}" if n > 1 else "")]
    return out


def _details(trace, address: int) -> str:
    counts = trace.entries.get(address)
    if not counts:
        return ""
    return "; ".join(f"{kind} {name} {n:,}" for (kind, name), n in sorted(counts.items()))


def listing(build: Build) -> list[tuple]:
    """The instructions of the build that ran under any monitor, in address order, decoded with Capstone:
    [("insn", Insn) | ("label", name) | ("gap", bytes)]."""
    from popek.decode import decode_at

    addresses = set()
    for trace in build.traces.values():
        addresses |= set(trace.executed) | set(trace.translated) | set(trace.entries)
    labels: dict[int, list[str]] = {}
    segments = build.guest.segments
    for name, value in build.guest.symbols.items():
        if any(a <= value < a + len(d) for a, d in segments) and not name.startswith("."):
            labels.setdefault(value, []).append(name)
    rows, end = [], None
    for address in sorted(addresses):
        segment = next(((a, d) for a, d in segments if a <= address < a + len(d)), None)
        if segment is None:
            continue                        # code written at run time outside the image: not listed
        if end is not None and address < end:
            continue                        # inside the previous instruction (overlapping decodings)
        insn = decode_at(segment[1], address - segment[0], segment[0], 32)
        if insn is None:
            continue
        if end is not None and address > end:
            rows.append(("gap", address - end))
        for label in sorted(n for v, ns in labels.items() if (end or address) <= v <= address for n in ns):
            rows.append(("label", label))
        rows.append(("insn", insn))
        end = address + insn.size
    return rows


# --- the page ---------------------------------------------------------------------------------------------
CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 2px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; } th, td { border: 1px solid #ddd; padding: 2px 6px; }
th { background: #f5f5f5; position: sticky; top: 0; } td.num { text-align: right; }
table.listing td { font: 12px/1.3 ui-monospace, monospace; white-space: nowrap; }
table.listing td.mark { min-width: 6em; max-width: 15em; white-space: normal; overflow-wrap: anywhere; } tr.label td { background: #fafafa; font-weight: bold; border: none; }
tr.gap td { color: #999; font-style: italic; border: none; } .status-diverges, .status-undecided { color: #b71c1c; font-weight: bold; }
.status-equivalent { color: #1b5e20; } .legend span { display: inline-block; padding: 1px 6px; margin: 2px; border: 1px solid #ccc; cursor: pointer; }
.note { color: #555; } .limits li { color: #8d6e63; } img.plot { max-width: 100%; border: 1px solid #eee; }
tr.dim td.mark, tr.dim td.code { opacity: 0.25; }
"""
SCRIPT = """
document.body.dataset.ready = "yes";
for (const item of document.querySelectorAll(".legend span")) {
  item.addEventListener("click", () => {
    const mark = item.dataset.mark, on = item.classList.toggle("chosen");
    for (const s of document.querySelectorAll(".legend span")) if (s !== item) s.classList.remove("chosen");
    for (const row of document.querySelectorAll("table.listing tr.insn"))
      row.classList.toggle("dim", on && !row.querySelector("td.m-" + mark));
  });
}
"""


def _e(value) -> str:
    return html.escape(str(value))


def render_html(doc: ReportDocument) -> str:
    from popek import __version__
    from popek.experiments import compare

    comparison = doc.comparison
    monitors = list(dict.fromkeys(c.monitor for c in comparison.cells))
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>popek report: "
             f"{_e(', '.join(g.name for g in doc.guests))}</title><style>{CSS}</style></head><body>",
             f"<h1>popek report</h1><p class=note>{_e(', '.join(g.name for g in doc.guests))} on the bare machine "
             f"(native, the reference) and under {_e(', '.join(m for m in monitors if m != 'native'))}; modelled "
             f"cycles on profile {_e(comparison.profile)}; popek {_e(__version__)}.</p>"]
    parts.append("<h2 id=comparison>Comparison</h2>")
    parts.append(_comparison_table(comparison))
    parts.append("<p class=note>same: console output, exit and visible state equal to the bare machine's (a "
                 "ported build: its console and exit). cycles: the run's events, counted exactly, priced on the "
                 f"profile (<code>popek profiles {_e(comparison.profile)}</code>: each number with its source, or "
                 "assumed); not wall time. A run that ends on its instruction budget is undecided.</p>")
    png = io.BytesIO()
    compare.plot(comparison, png)
    parts.append(f"<img class=plot alt='slowdown against native, and cycles by event kind' "
                 f"src='data:image/png;base64,{base64.b64encode(png.getvalue()).decode()}'>")
    for g in doc.guests:
        parts.append(f"<h2 id='{_e(g.name)}'>{_e(g.name)}</h2>")
        parts.append(_divergences(g))
        for b in g.builds:
            parts.append(_listing_html(b))
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _comparison_table(comparison) -> str:
    columns, rows = comparison.table()
    out = ["<table class=comparison><thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr></thead><tbody>"]
    status = columns.index("status")
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = "-" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.3f}" if isinstance(v, float) else str(v))
            cls = f" class='status-{_e(v)}'" if i == status else " class=num" if isinstance(v, (int, float)) else ""
            cells.append(f"<td{cls}>{_e(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _divergences(g: GuestReport) -> str:
    if not g.divergences:
        return "<p class=status-equivalent>Every monitor computed what the bare machine did.</p>"
    out = ["<h3>Divergences</h3>"]
    for d in g.divergences:
        out.append(f"<p><b>{_e(d['monitor'])}</b> ({_e(d['build'])}): <span class='status-{_e(d['status'])}'>"
                   f"{_e(d['status'])}</span></p><ul>" + "".join(f"<li>{_e(x)}</li>" for x in d["differences"] if x)
                   + "</ul>")
        if d["blamed"]:
            out.append("<table><thead><tr><th>address</th><th>instruction</th><th>execution</th><th>read under "
                       f"{_e(d['monitor'])}</th><th>the bare machine gave</th></tr></thead><tbody>")
            for b in d["blamed"]:
                out.append(f"<tr><td>{_e(b['address'])}</td><td>{_e(b['text'])} ({_e(b['name'])})</td>"
                           f"<td class=num>{b['occurrence']}</td><td>{_e(b['saw'])}</td><td>{_e(b['native'])}</td></tr>")
            out.append("</tbody></table>")
        elif d["ported"]:
            out.append("<p class=note>This build is another program (the source ported to the platform), and it "
                       "cannot run on the bare machine, so there is no run to pair its instructions with: it is "
                       "judged on its console and exit only, and no instruction is marked leaked.</p>")
        elif d["status"] == "diverges":
            out.append("<p class=note>No sensitive-unprivileged instruction of the loaded image read different "
                       "state: the difference comes from elsewhere (see <code>popek diff</code>).</p>")
    return "".join(out)


def _listing_html(b: Build) -> str:
    leaks_by_monitor = {}
    native = b.traces.get("native")
    from popek.experiments.divergence import blame
    for monitor in b.monitors:
        leaks: dict[int, list[dict]] = {}
        if native is not None and monitor != "native":
            for x in blame(native.observations, b.traces[monitor].observations):
                leaks.setdefault(int(x["address"], 16), []).append(x)
        leaks_by_monitor[monitor] = leaks
    marks = {m: marks_for(b, m, leaks_by_monitor[m]) for m in b.monitors}
    rows = listing(b)
    shown = [r for r in rows if r[0] == "insn"]
    out = [f"<h3>Listing, {_e(b.label)}</h3>"]
    used = {mk for per in marks.values() for ms in per.values() for mk, _ in ms}
    out.append("<p class=legend>" + "".join(f"<span class='m-{k}' data-mark='{k}' style='background:{c}'>{_e(text)}</span>"
                                             for k, (text, c) in MARKS.items() if k in used) + "</p>")
    limits = [(m, l) for m in b.monitors for l in b.traces[m].limits]
    if b.traces.get("native") is None:
        limits.append(("all", "no native run of this build: leaks cannot be found by comparison"))
    if len(shown) > LISTING_MAX:
        limits.append(("all", f"the listing shows the first {LISTING_MAX:,} of {len(shown):,} instructions that ran"))
    if limits:
        out.append("<ul class=limits>" + "".join(f"<li>{_e(m)}: {_e(l)}</li>" for m, l in limits) + "</ul>")
    out.append("<table class=listing><thead><tr><th>address</th><th>bytes</th><th>instruction</th>"
               + "".join(f"<th>{_e(m)}</th>" for m in b.monitors) + "</tr></thead><tbody>")
    count = 0
    for kind, value in rows:
        if kind == "label":
            out.append(f"<tr class=label><td colspan={3 + len(b.monitors)}>{_e(value)}:</td></tr>")
            continue
        if kind == "gap":
            out.append(f"<tr class=gap><td colspan={3 + len(b.monitors)}>… {value:,} bytes not executed "
                       f"(data, or code no run reached)</td></tr>")
            continue
        count += 1
        if count > LISTING_MAX:
            break
        insn = value
        cells = []
        for m in b.monitors:
            ms = marks[m].get(insn.address, [])
            classes = " ".join(f"m-{mk}" for mk, _ in ms)
            colour = MARKS[ms[0][0]][1] if ms else "transparent"
            text = "<br>".join(f"{_e(SHOWN.get(mk, mk))} {_e(label)}".strip() for mk, label in ms)
            title = _details(b.traces[m], insn.address)
            cells.append(f"<td class='mark {classes}' style='background:{colour}' title='{_e(title)}'>{text}</td>")
        out.append(f"<tr class=insn><td class=code>{insn.address:08x}</td><td class=code>{insn.raw.hex(' ')}</td>"
                   f"<td class=code>{_e(insn.text)}</td>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


# --- the command ------------------------------------------------------------------------------------------
def configure(p: argparse.ArgumentParser) -> None:
    from popek.monitors import MONITORS
    from popek.monitors.base import DEFAULT_BUDGET

    p.add_argument("guests", nargs="+", metavar="GUEST", help="flat images, ELF32 files or popek asm sources")
    p.add_argument("-o", "--output", required=True, metavar="HTML", help="the page to write")
    p.add_argument("--monitors", default=None, metavar="LIST",
                   help=f"comma-separated monitors (default all: {','.join(MONITORS)}); native always runs")
    p.add_argument("--profile", default="modern", metavar="NAME|FILE", help="cost profile (default modern)")
    p.add_argument("--max-instructions", type=int, default=DEFAULT_BUDGET, metavar="N")


def run(args: argparse.Namespace) -> int:
    from popek.textout import emit

    monitors = None
    if args.monitors is not None:
        monitors = tuple(m.strip() for m in args.monitors.split(",") if m.strip())
        if not monitors:
            raise UsageError("--monitors is empty: give at least one monitor")
    if args.max_instructions < 0:
        raise UsageError("--max-instructions must not be negative")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise BadInput(f"{args.output}: no such folder {str(out.parent)!r}")
    from popek import api
    doc = api.report(args.guests, monitors, args.profile, max_instructions=args.max_instructions)
    try:
        out.write_text(doc.to_html(), encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"cannot write {args.output}: {exc.strerror or exc}") from None
    diverging = sum(1 for c in doc.comparison.cells if c.status in ("diverges", "undecided"))
    emit(f"wrote {args.output}: {len(doc.guests)} guest(s), {len(doc.comparison.cells)} runs, "
         f"{diverging} not the same as native")
    return 0
