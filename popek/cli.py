"""The `popek` command. `main(argv) -> int` owns exit codes; everything below it raises typed errors.

Each subcommand lives in the module that owns its work and exposes two functions:
``configure(parser)`` adds its arguments and ``run(args) -> int`` does the work. This file only
wires them up and turns errors into one-line messages.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from popek import __version__
from popek.errors import PopekError

EXIT_OK = 0
EXIT_FOUND = 1  # scan: some sensitive-unprivileged instruction; diff, compare: a divergence
EXIT_BAD_INPUT = 2
EXIT_TRIPLE_FAULT = 3  # run: the guest ended in a triple fault (the machine reset)
EXIT_UNDECIDED = 4  # run: the instruction budget ran out; diff: a run ended on its budget, nothing decided
EXIT_UNSUPPORTED = 5  # run: the monitor met what it does not model; the run stopped there
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it): partial results were printed

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "demo": ("popek.classroom.tour", "a guided tour in steps: Popek-Goldberg, IA-32, the monitors, the cost"),
    "scan": ("popek.scanner.command", "classify every instruction of binaries in Popek-Goldberg terms"),
    "isa": ("popek.isa.command", "print the ISA description table under a model"),
    "theorem": ("popek.isa.theorem_command", "check Popek-Goldberg Theorems 1 and 3 for a model"),
    "asm": ("popek.asm.command", "assemble a guest source into a flat image and a listing"),
    "run": ("popek.machine.command", "run a guest on the bare machine or under a monitor"),
    "compare": ("popek.experiments.compare", "the same guests under every monitor, side by side"),
    "domains": ("popek.monitors.sun4v.command", "run sun4v logical domains with channels on one modelled chip"),
    "diff": ("popek.experiments.divergence", "run a guest natively and under a monitor; name the instructions that diverge"),
    "report": ("popek.experiments.report", "one self-contained HTML page: listing marked per monitor, table, plot, divergences"),
    "profiles": ("popek.cost.command", "the cost profiles, or every number of one with its source"),
    "exercise": ("popek.classroom.command", "exercises with checkers: list, show N, check N FILE..."),
    "bench": ("popek.experiments.bench", "benchmarks that print ratios measured in one run"),
}


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (``popek run: error: argument --ram: ...``) and no usage
    block before it: ``popek COMMAND --help`` shows the usage."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="popek",
        description="x86 virtualizability analyzer: can a virtual machine monitor run this code faithfully, "
        "why not, and at what cost?",
    )
    parser.add_argument("--version", action="version", version=f"popek {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks (for developers)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue  # command not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from popek.machine import interruptible

    from popek.textout import tolerant_streams

    tolerant_streams()   # an em dash or a non-UTF-8 file name must not be a traceback under any locale
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    interruptible.reset()
    try:
        status = args._run(args)
    except PopekError as exc:
        if args.traceback:
            raise
        print(f"popek {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"popek {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    # A run that Ctrl-C ended returned its partial result, which the command printed.
    return EXIT_INTERRUPTED if interruptible.pending() else status


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
