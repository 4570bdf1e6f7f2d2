"""`popek demo`: a guided tour in steps a teacher can project, on the bundled samples and real engines.

Each step is a title, the popek commands that reproduce it, and a function that prints it. On a terminal
the tour pauses between steps (Enter goes on, q stops); ``--no-pause`` never pauses, and neither does
output that is not a terminal. ``--list`` lists the steps, ``--step N`` shows one.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from popek.arguments import existing_directory
from popek.errors import BadInput, UsageError
from popek.textout import emit

SAMPLES = Path(__file__).resolve().parent.parent.parent / "samples"
LEAKY = "guests/store_tables.s"          # the guest whose observations diverge under trap-and-emulate


@dataclass(frozen=True)
class Step:
    title: str
    commands: tuple[str, ...]           # what reproduces the step
    show: Callable[[Path], None]


def _definitions(samples: Path) -> None:
    from popek import api

    emit("Popek & Goldberg (CACM 1974) on a third-generation machine: an instruction is\n"
         "  privileged   if it traps in user mode and not in supervisor mode;\n"
         "  sensitive    if it changes the machine's mode or resources (control-sensitive), or its effect\n"
         "               depends on them (behaviour-sensitive); innocuous otherwise.\n"
         "Theorem 1: a trap-and-emulate monitor can be built if every sensitive instruction is privileged.\n"
         "Theorem 3: a hybrid monitor (interpreting virtual supervisor mode) if every user-sensitive one is.\n")
    for isa, model in (("isa/popek-goldberg.isa", "machine"), ("isa/pdp10.isa", "monitor")):
        result = api.theorem(model, samples / isa)
        emit(f"{result.isa.title}, model {model}:")
        for v in result.verdicts:
            kind = ("sensitive" if v.sensitive else "innocuous") + (", privileged" if v.instruction.is_privileged else "")
            emit(f"  {v.instruction.name:8} {kind:24} {'traps' if v.traps else 'does not trap':14} {v.why}")
        emit(f"  -> {result.conclusion}\n")


def _ia32(samples: Path) -> None:
    from popek import api

    result = api.theorem("ia32")
    emit(f"IA-32, the guest kernel deprivileged to ring 3: {len(result.theorem1_violations)} sensitive "
         f"instructions do not trap ({len(result.robin_irvine)} of them on Robin & Irvine's list, USENIX "
         f"Security 2000):")
    for v in result.theorem1_violations:
        emit(f"  {v.instruction.name:13} {v.why}")
    emit(f"  -> {result.conclusion}")
    for model in ("ia32-umip", "vtx", "sun4v"):
        r = api.theorem(model)
        emit(f"  {model:10} Theorem 1 {'holds' if not r.theorem1_violations else 'fails'}: {r.conclusion}")
    from popek.scanner.render import render

    emit("\nA VM-aware program uses exactly these instructions to see through a monitor:")
    emit(render(api.scan(samples / "bin" / "vmdetect"), "text"))


def _divergence(samples: Path) -> None:
    from popek import api

    emit(api.diff(samples / LEAKY, "trap").render_text())


def _rescue(samples: Path) -> None:
    from popek import api
    from popek.monitors import MONITORS

    guest = samples / LEAKY
    native = api.run(guest)
    emit(f"{LEAKY} on the bare machine: exit {native.exit.reason} {native.exit.code}")
    for monitor in (m for m in MONITORS if m not in ("native", "trap")):
        result = api.run(guest, monitor)
        same = result.console == native.console and result.exit == native.exit
        work = _work(result.events)
        emit(f"  {monitor:8} {'same as native' if same else 'DIFFERS':15} {work}")


def _work(events: dict) -> str:
    from popek.events import monitor_work

    work = monitor_work(events)
    return ", ".join(f"{kind} {n:,}" for kind, n in sorted(work.items())) or "no monitor work"


def _cost(samples: Path) -> None:
    from popek.experiments.compare import demo_table

    emit(demo_table(samples))


STEPS = (
    Step("Popek & Goldberg's definitions on a toy machine, and the theorems",
         ("popek theorem machine --isa samples/isa/popek-goldberg.isa",
          "popek theorem monitor --isa samples/isa/pdp10.isa"), _definitions),
    Step("Theorem 1 fails on IA-32: the instructions, and why",
         ("popek theorem ia32", "popek isa ia32", "popek scan samples/bin/vmdetect"), _ia32),
    Step("A guest whose observations diverge under trap-and-emulate, the instructions named",
         (f"popek diff samples/{LEAKY} --monitor trap",), _divergence),
    Step("The same guest rescued: what each technique did instead",
         tuple(f"popek run samples/{LEAKY} --monitor {m}" for m in ("bt", "emulate")), _rescue),
    Step("What it costs",
         ("popek compare samples/guests/timer.s samples/guests/store_tables.s samples/guests/flags.s "
          "samples/guests/kernel.s",), _cost),
)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=existing_directory, default=SAMPLES, help="the samples folder (default: the checkout's)")
    p.add_argument("--list", action="store_true", help="list the steps")
    p.add_argument("--step", type=int, metavar="N", help="show step N only")
    p.add_argument("--no-pause", action="store_true", help="never wait for Enter between steps")


def run(args: argparse.Namespace) -> int:
    if args.list:
        emit("".join(f"{n}. {s.title}\n" for n, s in enumerate(STEPS, 1)))
        return 0
    if args.step is not None and not 1 <= args.step <= len(STEPS):
        raise UsageError(f"--step must be 1..{len(STEPS)}, not {args.step}")
    if not (args.samples / LEAKY).exists():
        raise BadInput(f"{args.samples}: bundled samples not found (run from a source checkout, or pass --samples)")
    chosen = [args.step] if args.step is not None else range(1, len(STEPS) + 1)
    pause = not args.no_pause and sys.stdin.isatty() and sys.stdout.isatty()
    for i, n in enumerate(chosen):
        step = STEPS[n - 1]
        emit(f"\n{'=' * 100}\n{n}. {step.title}\n{'=' * 100}")
        emit("".join(f"   $ {c}\n" for c in step.commands))
        step.show(args.samples)
        if pause and i + 1 < len(chosen):
            try:
                if input("\n[Enter: next step, q: stop] ").strip().lower() == "q":
                    break
            except EOFError:
                break
    return 0
