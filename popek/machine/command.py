"""``popek run GUEST``: run a guest on the bare machine or under a monitor and report how it ended.

Text output (default): the guest's console output, then the exit, a short state and the event counts.
JSON output: the run document (docs/run-document.md). Every option is checked before the guest is
loaded. Exit status (``EXIT_STATUS``): 0 when the guest ended the run itself through the exit port or
``hlt`` (its exit code is in the output), 3 for a triple fault, 4 when the instruction budget ran out,
130 when Ctrl-C interrupted the run (the partial result is printed first), 2 for a bad guest file or
command line.
"""
from __future__ import annotations

import argparse
import json
import sys

from popek import arguments
from popek.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_TRIPLE_FAULT, EXIT_UNDECIDED
from popek.errors import UsageError
from popek.machine.memory import MIB, RAM_DEFAULT, RAM_MAX
from popek.machine.result import BUDGET, EXIT_PORT, HLT, INTERRUPTED, TRIPLE_FAULT
from popek.monitors import MONITORS, get_monitor, run_guest
from popek.monitors.base import DEFAULT_BUDGET

EXIT_STATUS = {EXIT_PORT: EXIT_OK, HLT: EXIT_OK, TRIPLE_FAULT: EXIT_TRIPLE_FAULT, BUDGET: EXIT_UNDECIDED,
               INTERRUPTED: EXIT_INTERRUPTED}


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """What every command that runs guests takes: the budget, RAM, UMIP and the monitor's own options."""
    parser.add_argument("--max-instructions", type=arguments.budget, default=DEFAULT_BUDGET, metavar="N",
                        help=f"instruction budget; a run that reaches it ends with reason 'budget' "
                             f"(default {DEFAULT_BUDGET:,})")
    parser.add_argument("--ram", type=arguments.in_range(1, RAM_MAX // MIB, " MiB"), default=RAM_DEFAULT // MIB,
                        metavar="MiB", help=f"guest RAM size (default {RAM_DEFAULT // MIB})")
    parser.add_argument("--umip", action="store_true",
                        help="model CR4.UMIP: sgdt/sidt/sldt/smsw/str fault with #GP(0) at CPL > 0")
    parser.add_argument("--ring", type=arguments.integer, default=None, metavar="N",
                        help="trap: the real ring the guest kernel runs at, 1, 2 or 3 (default 3)")
    parser.add_argument("--direct-user", action="store_true",
                        help="bt: run guest user code (CPL 3) untranslated, as VMware did")


def monitor_options(args: argparse.Namespace) -> dict:
    """The monitor options given on the command line (``add_run_options``), as constructor arguments."""
    options = {} if args.ring is None else {"ring": args.ring}
    if args.direct_user:
        options["direct_user"] = True
    return options


def check_monitor(monitor: str, options: dict) -> None:
    """UsageError now, before any work, when ``monitor`` does not take ``options`` or rejects a value."""
    get_monitor(monitor, **options)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("guest", help="flat image, ELF32 executable or assembly source (.s/.S/.asm)")
    parser.add_argument("--monitor", type=arguments.monitor_name, default="native",
                        help=f"one of: {', '.join(MONITORS)} (default native)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    add_run_options(parser)
    parser.add_argument("--entry", type=arguments.address, default=None, metavar="ADDR", help="start here instead")
    parser.add_argument("--load-address", type=arguments.address, default=None, metavar="ADDR",
                        help="where a flat image goes (default 0x100000)")


def run(args: argparse.Namespace) -> int:
    from popek.machine.guest import SOURCE_SUFFIXES, load_guest
    options = monitor_options(args)
    check_monitor(args.monitor, options)
    ram = args.ram * MIB
    for flag, value in (("--entry", args.entry), ("--load-address", args.load_address)):
        if value is not None and value >= ram:
            raise UsageError(f"{flag} {value:#x} is outside {args.ram} MiB of guest RAM")
    if args.load_address is not None and args.guest.endswith(SOURCE_SUFFIXES):
        raise UsageError("--load-address applies to flat images (a source says where it goes with .org)")
    guest = load_guest(args.guest, load_address=args.load_address, entry=args.entry, ram_size=ram)
    if args.load_address is not None and guest.format != "flat":
        raise UsageError(f"--load-address applies to flat images, not to {guest.format} {guest.name}")
    result = run_guest(guest, args.monitor, max_instructions=args.max_instructions, ram_size=ram,
                       umip=args.umip, **options)
    if args.format == "json":
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(result.render_text())
    return EXIT_STATUS[result.exit.reason]
