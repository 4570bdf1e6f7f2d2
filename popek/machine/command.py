"""``popek run GUEST``: run a guest on the bare machine or under a monitor and report how it ended.

Text output (default): the guest's console output, then the exit, a short state and the event counts.
JSON output: the run document (docs/run-document.md). Every option is checked before the guest is
loaded. Exit status (``EXIT_STATUS``): 0 when the guest ended the run itself through the exit port or
``hlt`` or, under pv, a sched_op shutdown, under sun4v, mach_exit (its exit code is in the output), 3 for a triple fault (or a
pv domain the hypervisor crashed), 4 when the instruction budget ran out,
130 when Ctrl-C interrupted the run (the partial result is printed first), 2 for a bad guest file or
command line.
"""
from __future__ import annotations

import argparse
import json
import sys

from popek import arguments
from popek.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_TRIPLE_FAULT, EXIT_UNDECIDED, EXIT_UNSUPPORTED
from popek.errors import UsageError
from popek.machine.memory import MIB, RAM_DEFAULT, RAM_MAX
from popek.machine.result import BUDGET, CRASH, EXIT_PORT, HLT, INTERRUPTED, MACH_EXIT, SHUTDOWN, TRIPLE_FAULT, \
    UNSUPPORTED
from popek.monitors import MONITORS, get_monitor
from popek.monitors.base import DEFAULT_BUDGET
from popek.monitors.hvm import command as hvm_command

EXIT_STATUS = {EXIT_PORT: EXIT_OK, HLT: EXIT_OK, SHUTDOWN: EXIT_OK, MACH_EXIT: EXIT_OK, TRIPLE_FAULT: EXIT_TRIPLE_FAULT,
               CRASH: EXIT_TRIPLE_FAULT, BUDGET: EXIT_UNDECIDED, INTERRUPTED: EXIT_INTERRUPTED,
               UNSUPPORTED: EXIT_UNSUPPORTED}


def add_run_options(parser: argparse.ArgumentParser, trace_exits: bool = True) -> None:
    """What every command that runs guests takes: the budget, RAM, UMIP and the monitors' own options
    (hvm's control set; ``trace_exits``: also hvm's --trace-exits)."""
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
    hvm_command.configure(parser, trace=trace_exits)


def monitor_options(args: argparse.Namespace) -> dict:
    """The monitor options given on the command line (``add_run_options``), as constructor arguments."""
    options = {} if args.ring is None else {"ring": args.ring}
    if args.direct_user:
        options["direct_user"] = True
    if getattr(args, "cmdline", None) is not None:
        options["cmdline"] = args.cmdline
    options.update(hvm_command.options(args))
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
    parser.add_argument("--profile", default="modern", metavar="NAME|FILE",
                        help="cost profile for the modelled cycles (default modern; `popek profiles` lists them)")
    parser.add_argument("--entry", type=arguments.address, default=None, metavar="ADDR", help="start here instead")
    parser.add_argument("-D", dest="defines", metavar="NAME[=VALUE]", action="append", default=[],
                        help="for an assembly source: define NAME (e.g. -D PV builds a guest's paravirtual port)")
    parser.add_argument("--cmdline", default=None, metavar="TEXT", help="pv: the start_info command line")
    parser.add_argument("--load-address", type=arguments.address, default=None, metavar="ADDR",
                        help="where a flat image goes (default 0x100000)")


def run(args: argparse.Namespace) -> int:
    from popek import api
    from popek.asm.assemble import parse_define
    from popek.cost import load as load_profile
    from popek.machine.guest import SOURCE_SUFFIXES, load_guest
    options = monitor_options(args)
    check_monitor(args.monitor, options)
    profile = load_profile(args.profile)                # a bad profile is an error before the run
    ram = args.ram * MIB
    for flag, value in (("--entry", args.entry), ("--load-address", args.load_address)):
        if value is not None and value >= ram:
            raise UsageError(f"{flag} {value:#x} is outside {args.ram} MiB of guest RAM")
    if args.load_address is not None and args.guest.endswith(SOURCE_SUFFIXES):
        raise UsageError("--load-address applies to flat images (a source says where it goes with .org)")
    defines = dict(parse_define(d) for d in args.defines)
    if defines and not args.guest.endswith(SOURCE_SUFFIXES):
        raise UsageError("-D applies to assembly sources (.s, .S, .asm) only")
    guest = load_guest(args.guest, load_address=args.load_address, entry=args.entry, ram_size=ram,
                       defines=defines or None)
    if args.load_address is not None and guest.format != "flat":
        raise UsageError(f"--load-address applies to flat images, not to {guest.format} {guest.name}")
    result = api.run(guest, args.monitor, max_instructions=args.max_instructions, ram_size=ram,
                     umip=args.umip, profile=profile, **options)
    if args.format == "json":
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(result.render_text())
    return EXIT_STATUS[result.exit.reason]
