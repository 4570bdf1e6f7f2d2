"""`popek theorem MODEL`: check Popek-Goldberg Theorems 1 and 3 and explain the verdict."""
from __future__ import annotations

import argparse
import json

from popek.errors import UsageError
from popek.isa import language
from popek.isa.model import IsaDescription
from popek.isa.theorem import TheoremResult, check
from popek.textout import console, emit


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="model to check (default: the description's first model, ia32 for the "
                   "bundled one); `popek isa --models` lists them")
    p.add_argument("--isa", metavar="FILE", help="ISA description (default: the bundled IA-32 one)")
    p.add_argument("--format", choices=("text", "json"), default="text")


def run(args: argparse.Namespace) -> int:
    isa = language.load(args.isa)
    result = check(isa, default_model(isa, args.model))
    emit(json.dumps(result.to_dict(), indent=2) if args.format == "json" else render_text(result))
    return 0


def default_model(isa: IsaDescription, name: str | None) -> str:
    if name:
        return name
    if not isa.models:
        raise UsageError(f"{isa.path} defines no model; add one (`model NAME \"...\" {{ guest-ring 3 }}`)")
    return next(iter(isa.models))


def render_text(r: TheoremResult) -> str:
    from rich.table import Table

    con, buf = console()
    con.print(f"[bold]{r.isa.title}[/bold] under model [bold]{r.model.name}[/bold]: {r.model.description}")
    con.print(f"guest kernel at real ring {r.model.guest_ring}\n")
    for number, statement, violations in (
        (1, "every sensitive instruction is privileged: it traps to the monitor", r.theorem1_violations),
        (3, "every user-sensitive instruction is privileged", r.theorem3_violations),
    ):
        verdict = "HOLDS" if not violations else f"FAILS ({len(violations)} instructions)"
        con.print(f"[bold]Theorem {number}[/bold] ({statement}): [bold]{verdict}[/bold]")
        if violations:
            table = Table(show_edge=False, pad_edge=False, box=None)
            table.add_column("instruction", no_wrap=True)
            table.add_column("sensitivity", no_wrap=True)
            table.add_column("touches", max_width=24)
            table.add_column("why it escapes the monitor", ratio=1, overflow="fold")
            for v in violations:
                i = v.instruction
                table.add_row(i.name, ", ".join(i.sensitive) or "-",
                              " ".join(sorted(i.touches - r.model.virtualizes)),
                              i.deprivileged_why or i.sensitive_why)
            con.print(table)
        con.print()
    trapping = [v.instruction.name for v in r.verdicts if v.traps and v.instruction.sensitive]
    if r.model.virtualizes:
        con.print(f"Why: the hardware gives the guest its own {' '.join(sorted(r.model.virtualizes))} "
                  f"({r.model.virtualizes_why}).")
    if trapping:
        con.print(f"{len(trapping)} sensitive instructions trap to the monitor under {r.model.name}: "
                  f"{' '.join(trapping)}.\n")
    if r.model.exits:
        con.print(f"How they leave the guest under {r.model.name} (exit reason, and the controls that enable it):")
        for name in (v.instruction.name for v in r.verdicts if v.traps):
            for e in r.model.exits_for(name):
                con.print(f"  {name}{' ' + e.when if e.when else ''}: {e.describe()}")
        con.print()
    if r.robin_irvine:
        groups: dict[str, list[str]] = {}
        for g, m in r.robin_irvine:
            groups.setdefault(g, []).append(m)
        con.print(f"Robin & Irvine's list, as it survives under {r.model.name}: {len(r.robin_irvine)} mnemonics")
        for g, mnemonics in groups.items():
            con.print(f"  {g}: {' '.join(mnemonics)}  ({r.isa.groups.get(g, '')})")
        con.print()
    for note in r.model.notes:
        con.print(f"note: {note}")
    con.print(f"\n[bold]Verdict:[/bold] {r.conclusion}.")
    if r.model.sources:
        con.print(f"sources: {'; '.join(r.model.sources)}")
    return buf.getvalue()
