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
    show: Callable[[argparse.Namespace], None]      # gets the command's arguments (samples, plot)


def _definitions(args: argparse.Namespace) -> None:
    samples = args.samples
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


def _ia32(args: argparse.Namespace) -> None:
    samples = args.samples
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


def _divergence(args: argparse.Namespace) -> None:
    samples = args.samples
    from popek import api

    emit(api.diff(samples / LEAKY, "trap").render_text())


# What each technique does instead of letting the guest run a sensitive instruction, by the event kinds that
# show it (popek.events); a monitor whose kinds are not listed shows its largest monitor kinds.
TECHNIQUE = {
    "emulate": ("interprets every instruction in software", ("sensitive",)),
    "bt": ("translates kernel code, sensitive instructions become callouts", ("callout", "translation")),
    "pv": ("the ported kernel at ring 1: hypercalls instead of privileged instructions", ("hypercall", "upcall")),
    "hvm": ("runs it unmodified in VMX non-root mode: VM exits by reason", ("exit",)),
    "sun4v": ("the sun4v model: hyperprivileged traps and hypervisor API calls", ("hypertrap", "hypercall")),
}
NOT_RESCUERS = ("native", "trap")


def rescuers() -> tuple[str, ...]:
    """Every registered monitor but the reference and the one that fails: a new monitor joins the step."""
    from popek.monitors import MONITORS

    return tuple(m for m in MONITORS if m not in NOT_RESCUERS)


def _build_flags(monitor: str) -> str:
    from popek.monitors import platform_defines

    return "".join(f" -D {k}" for k in platform_defines(monitor))


def _rescue(args: argparse.Namespace) -> None:
    samples = args.samples
    from popek import api
    from popek.events import KINDS, MONITOR, SENSITIVE_UNPRIVILEGED, monitor_work
    from popek.experiments.compare import verdict
    from popek.monitors import platform_defines

    source = samples / LEAKY
    native = api.run(source)
    emit(f"{LEAKY} on the bare machine: {native.console.splitlines()[-1]} (exit {native.exit.code})\n")
    for monitor in rescuers():
        defines = platform_defines(monitor)
        result = api.run(api.assemble(source, defines=defines or None), monitor)
        status, first = verdict(native, result, ported=bool(defines))
        what, kinds = TECHNIQUE.get(monitor, ("", ()))
        kinds = kinds or tuple(sorted(monitor_work(result.events), key=lambda k: -monitor_work(result.events)[k])[:2])
        build = f"{monitor} (its{_build_flags(monitor)} build)" if defines else monitor
        emit(f"  {build}: {what}")
        emit(f"    {'same as native' if status == 'equivalent' else status.upper()}: "
             f"{result.console.splitlines()[-1] if result.console else '(no output)'}"
             + (f" -- {first}" if first else ""))
        for kind in kinds:
            names = result.events.get(kind, {})
            if names and KINDS[kind].role == MONITOR or kind == "sensitive" and names:
                # the sensitive-unprivileged instructions first: what the step is about
                top = sorted(names.items(), key=lambda kv: (kv[0] not in SENSITIVE_UNPRIVILEGED, -kv[1], kv[0]))
                shown = ", ".join(f"{n} {c:,}" for n, c in top[:8]) + (f", +{len(top) - 8} more" if len(top) > 8 else "")
                emit(f"    {kind}: {shown}")
        if monitor == "pv" and status != "equivalent":
            emit("    (paravirtualization removes the kernel's privileged instructions; the sensitive-unprivileged "
                 "ones it keeps still read the real tables, so a PV kernel must not rely on them)")
    emit("\nsun4v: " + ("registered, shown above" if "sun4v" in rescuers() else
                        "not a registered monitor in this build (popek theorem sun4v shows its model)"))


def _cost(args: argparse.Namespace) -> None:
    from popek import api
    from popek.experiments.compare import SAMPLE_GUESTS, plot, render_text

    comparison = api.compare([args.samples / "guests" / g for g in SAMPLE_GUESTS])
    emit(render_text(comparison))
    if args.plot:
        plot(comparison, args.plot)
        emit(f"the plot: {args.plot}")
    else:
        emit("the plot: popek demo --step 5 --plot cost.png (or popek compare ... --plot cost.png)")


STEPS = (
    Step("Popek & Goldberg's definitions on a toy machine, and the theorems",
         ("popek theorem machine --isa samples/isa/popek-goldberg.isa",
          "popek theorem monitor --isa samples/isa/pdp10.isa"), _definitions),
    Step("Theorem 1 fails on IA-32: the instructions, and why",
         ("popek theorem ia32", "popek isa ia32", "popek scan samples/bin/vmdetect"), _ia32),
    Step("A guest whose observations diverge under trap-and-emulate, the instructions named",
         (f"popek diff samples/{LEAKY} --monitor trap",), _divergence),
    Step("The same guest rescued: what each technique did instead",
         tuple(f"popek run samples/{LEAKY}{_build_flags(m)} --monitor {m}" + (" --trace-exits" if m == "hvm" else "")
               for m in rescuers()), _rescue),
    Step("What it costs",
         ("popek compare samples/guests/timer.s samples/guests/store_tables.s samples/guests/flags.s "
          "samples/guests/kernel.s --plot cost.png",), _cost),
)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=existing_directory, default=SAMPLES, help="the samples folder (default: the checkout's)")
    p.add_argument("--list", action="store_true", help="list the steps")
    p.add_argument("--step", type=int, metavar="N", help="show step N only")
    p.add_argument("--no-pause", action="store_true", help="never wait for Enter between steps")
    p.add_argument("--plot", metavar="PNG", help="step 5: also draw the cost plot into this file")


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
        step.show(args)
        if pause and i + 1 < len(chosen):
            try:
                if input("\n[Enter: next step, q: stop] ").strip().lower() == "q":
                    break
            except EOFError:
                break
    return 0
