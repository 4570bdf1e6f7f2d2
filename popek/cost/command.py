"""`popek profiles [NAME|FILE]`: the cost profiles, or every number of one with where it comes from."""
from __future__ import annotations

import argparse

from popek.cost import profile as profiles
from popek.textout import emit


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", nargs="?", metavar="NAME|FILE", help="print every number of this profile")


def run(args: argparse.Namespace) -> int:
    if args.profile is None:
        for name in profiles.names():
            p = profiles.load(name)
            rows = p.rows()
            assumed = sum(1 for _, price in rows if price.is_assumed)
            emit(f"{name:18} {p.processor}  ({len(rows)} numbers, {assumed} assumed)")
        return 0
    p = profiles.load(args.profile)
    clock = f", {p.clock_ghz} GHz" if p.clock_ghz else ""
    emit(f"{p.name}: {p.processor}{clock}\n" + "".join(
        f"  {what:32} {price.cycles:>10,.0f}  {price.provenance}\n" for what, price in p.rows()))
    return 0
