"""``popek domains CONFIG.toml``: run sun4v logical domains together (popek.monitors.sun4v.domains).

Text (default): per domain its console, exit, state and events, then the channel traffic. JSON: one
document ``{"schema", "chip", "domains": [run documents with "domain"], "channels": [{"name", "entries"}]}``.
Exit status 0 whenever the domains ran (however each ended); 2 for a bad configuration or command line.
"""
from __future__ import annotations

import argparse
import json

from popek.errors import UsageError
from popek.textout import emit


def configure(p: argparse.ArgumentParser) -> None:
    from popek.monitors.base import DEFAULT_BUDGET
    from popek.monitors.sun4v.domains import DEFAULT_SLICE

    p.add_argument("config", metavar="CONFIG.toml", help="the domain configuration (samples/domains/)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--slice", type=int, default=DEFAULT_SLICE, metavar="N",
                   help=f"guest instructions each domain runs per turn (default {DEFAULT_SLICE})")
    p.add_argument("--max-instructions", type=int, default=DEFAULT_BUDGET, metavar="N",
                   help=f"instruction budget of each domain (default {DEFAULT_BUDGET})")
    p.add_argument("--profile", default="ultrasparc-t1", metavar="NAME|FILE",
                   help="cost profile for the modelled cycles (default ultrasparc-t1)")


def run(args: argparse.Namespace) -> int:
    from popek.cost import load as load_profile
    from popek.monitors.sun4v.domains import load_config, run_domains

    if args.slice < 1:
        raise UsageError("--slice must be at least 1")
    if args.max_instructions < 0:
        raise UsageError("--max-instructions must not be negative")
    profile = load_profile(args.profile)
    result = run_domains(load_config(args.config), args.max_instructions, args.slice, profile)
    emit(json.dumps(result.to_dict(), indent=2) if args.format == "json" else result.render_text().rstrip("\n"))
    return 0
