"""The hvm options of ``popek run`` and ``popek diff``: --vendor, --controls, --control, --trace-exits."""
from __future__ import annotations

import argparse
import sys

from popek.errors import UsageError


def configure(p: argparse.ArgumentParser, trace: bool = True) -> None:
    g = p.add_argument_group("hvm (hardware-assisted virtualization)")
    g.add_argument("--vendor", choices=("vtx", "svm"), default=None,
                   help="hvm: whose exit reasons (VT-x basic exit reasons, AMD-V exit codes; default from the controls)")
    g.add_argument("--controls", metavar="NAME|FILE", default=None,
                   help="hvm: a bundled control set (kvm, vtx-2005, svm; default kvm, or svm with --vendor svm) or a "
                        "control file")
    g.add_argument("--control", metavar="KEY=VALUE", action="append", default=[],
                   help="hvm: change one setting of the control set (repeatable), e.g. rdtsc-exiting=on")
    if trace:
        g.add_argument("--trace-exits", action="store_true", help="hvm: print every exit in order with its "
                                                                  "qualification")


def options(args: argparse.Namespace) -> dict:
    """The monitor options these flags give; UsageError when given for another monitor."""
    opts: dict = {}
    if args.vendor:
        opts["vendor"] = args.vendor
    if args.controls:
        opts["controls"] = args.controls
    if args.control:
        opts["control"] = tuple(args.control)
    if getattr(args, "trace_exits", False):
        opts["trace_exits"] = lambda line: sys.stdout.write(line + "\n")
    if opts and args.monitor != "hvm":
        flags = ", ".join(sorted({"vendor": "--vendor", "controls": "--controls", "control": "--control",
                                  "trace_exits": "--trace-exits"}[k] for k in opts))
        raise UsageError(f"{flags}: only for --monitor hvm")
    return opts
