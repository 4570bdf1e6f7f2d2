"""``popek run GUEST``: run a guest on the bare machine or under a monitor and report how it ended.

Text output (default): the guest's console output, then the exit, a short state and the event counts.
JSON output: the document of DESIGN §3.4. The exit status is 0 whenever the run produced a result, however
the guest ended (its exit code is in the output); 2 for a bad guest file or command line.
"""
from __future__ import annotations

import argparse
import json
import sys

from popek.errors import UsageError
from popek.machine.memory import MIB, RAM_DEFAULT, RAM_MAX
from popek.monitors import MONITORS, get_monitor
from popek.monitors.base import DEFAULT_BUDGET
from popek.monitors.hvm import command as hvm_command


def _number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("guest", help="flat image, ELF32 executable or assembly source (.s/.S/.asm)")
    parser.add_argument("--monitor", default="native", help=f"one of: {', '.join(MONITORS)} (default native)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--max-instructions", type=_number, default=DEFAULT_BUDGET, metavar="N",
                        help=f"instruction budget; the run ends with reason 'budget' (default {DEFAULT_BUDGET})")
    parser.add_argument("--ram", type=_number, default=RAM_DEFAULT // MIB, metavar="MiB",
                        help=f"guest RAM size (default {RAM_DEFAULT // MIB})")
    parser.add_argument("--umip", action="store_true",
                        help="model CR4.UMIP: sgdt/sidt/sldt/smsw/str fault with #GP(0) at CPL > 0")
    parser.add_argument("--ring", type=int, default=None, metavar="N",
                        help="the real ring a deprivileging monitor runs the guest kernel at (trap: 3 or 1; "
                             "default 3)")
    parser.add_argument("--direct-user", action="store_true",
                        help="bt: run guest user code (CPL 3) untranslated, as VMware did")
    parser.add_argument("--profile", default="modern", metavar="NAME|FILE",
                        help="cost profile for the modelled cycles (default modern; `popek profiles` lists them)")
    parser.add_argument("--entry", type=_number, default=None, metavar="ADDR", help="start here instead")
    parser.add_argument("-D", dest="defines", metavar="NAME[=VALUE]", action="append", default=[],
                        help="for an assembly source: define NAME (e.g. -D PV builds a guest's paravirtual port)")
    parser.add_argument("--cmdline", default=None, metavar="TEXT", help="pv: the start_info command line")
    parser.add_argument("--load-address", type=_number, default=None, metavar="ADDR",
                        help="where a flat image goes (default 0x100000)")
    hvm_command.configure(parser)


def run(args: argparse.Namespace) -> int:
    from popek import api
    from popek.asm.assemble import parse_define
    from popek.machine.guest import SOURCE_SUFFIXES, load_guest

    options = {} if args.ring is None else {"ring": args.ring}
    if args.direct_user:
        options["direct_user"] = True
    if args.cmdline is not None:
        options["cmdline"] = args.cmdline
    options.update(hvm_command.options(args))
    ram = args.ram * MIB
    if not 1 <= args.ram <= RAM_MAX // MIB:
        raise UsageError(f"--ram must be between 1 and {RAM_MAX // MIB} MiB")
    if args.max_instructions < 0:
        raise UsageError("--max-instructions must not be negative")
    get_monitor(args.monitor, **options)            # a bad monitor, flag or control set: before the guest loads
    from popek.cost import load as load_profile
    profile = load_profile(args.profile)
    defines = dict(parse_define(d) for d in args.defines)
    if defines and not args.guest.endswith(SOURCE_SUFFIXES):
        raise UsageError("-D applies to assembly sources (.s, .S, .asm) only")
    guest = load_guest(args.guest, load_address=args.load_address, entry=args.entry, ram_size=ram,
                       defines=defines or None)
    result = api.run(guest, args.monitor, max_instructions=args.max_instructions, ram_size=ram,
                     umip=args.umip, profile=profile, **options)
    if args.format == "json":
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(result.render_text())
    return 0
