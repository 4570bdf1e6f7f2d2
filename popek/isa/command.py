"""`popek isa [MODEL]`: the description as a table, with each instruction's verdict under the model."""
from __future__ import annotations

import argparse
import json

from popek.isa import language
from popek.isa.model import IsaDescription, Model, Verdict
from popek.isa.theorem import default_model
from popek.textout import console, emit


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="model whose verdicts to show (default: the first, ia32 for the bundled description)")
    p.add_argument("--isa", metavar="FILE", help="ISA description (default: the bundled IA-32 one)")
    p.add_argument("--models", action="store_true", help="list the models and exit")
    p.add_argument("--format", choices=("text", "json"), default="text")


def verdict_word(v: Verdict) -> str:
    if v.traps:
        return "traps"
    if v.sensitive:
        return "ESCAPES"
    return "virtualized" if v.instruction.sensitive else "innocuous"


def run(args: argparse.Namespace) -> int:
    isa = language.load(args.isa)
    if args.models:
        if args.format == "json":
            emit(json.dumps({m.name: {"description": m.description, "guest_ring": m.guest_ring,
                                      "extends": m.base} for m in isa.models.values()}, indent=2))
        else:
            emit("\n".join(f"{m.name:12} {m.description}" for m in isa.models.values()))
        return 0
    model = isa.model(default_model(isa, args.model))
    verdicts = isa.verdicts(model)
    emit(_json(isa, model, verdicts) if args.format == "json" else _text(isa, model, verdicts))
    return 0


def _json(isa: IsaDescription, model: Model, verdicts: list[Verdict]) -> str:
    rows = []
    for v in verdicts:
        i = v.instruction
        rows.append({
            "name": i.name, "summary": i.summary, "category": i.category, "privileged": i.privileged,
            "sensitive": list(i.sensitive), "user_sensitive": i.user_sensitive, "reads": list(i.reads),
            "writes": list(i.writes), "deprivileged": i.deprivileged, "deprivileged_why": i.deprivileged_why,
            "robin_irvine": list(i.robin_irvine) if i.robin_irvine else None, "sources": list(i.sources),
            "notes": [{"mode": m, "text": t} for m, t in i.notes],
            "under_model": {"verdict": verdict_word(v), "sensitive": v.sensitive, "traps": v.traps, "why": v.why},
        })
    return json.dumps({"isa": isa.name, "model": model.name, "instructions": rows}, indent=2)


def _text(isa: IsaDescription, model: Model, verdicts: list[Verdict]) -> str:
    from rich.table import Table

    con, buf = console()
    con.print(f"[bold]{isa.title}[/bold] — {len(verdicts)} instructions under model "
              f"[bold]{model.name}[/bold]: {model.description}\n")
    table = Table(show_edge=False, pad_edge=False, box=None)
    table.add_column("instruction", no_wrap=True)
    table.add_column("category", no_wrap=True)
    table.add_column("priv", no_wrap=True)
    table.add_column("sensitivity", max_width=20)
    table.add_column("touches", max_width=22)
    table.add_column(model.name, no_wrap=True)
    table.add_column("why", ratio=1, overflow="fold")
    for v in verdicts:
        i = v.instruction
        table.add_row(i.name, i.category, i.privileged, ", ".join(i.sensitive) or "-",
                      " ".join(sorted(i.touches)) or "-", verdict_word(v), v.why)
    con.print(table)
    con.print("\npriv: yes = #GP at CPL > 0; iopl = when CPL > IOPL; conditional = when a control bit is set. "
              f"{model.name}: traps / ESCAPES (sensitive and does not trap) / virtualized / innocuous.")
    return buf.getvalue()
