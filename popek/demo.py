"""`popek demo`: the tour a newcomer sees first — on bundled samples, with real engines.

1. the verdict of Popek-Goldberg's theorems on classic IA-32 and under VT-x;
2. a scan of a VM-aware example binary (samples/bin/vmdetect);
3. sample guests run on the bare machine and under the monitors that exist, side by side (when built).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from popek.errors import BadInput
from popek.textout import emit

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=Path, default=SAMPLES, help="the samples folder (default: the checkout's)")


def _section(title: str) -> str:
    return f"\n{'=' * 100}\n{title}\n{'=' * 100}"


def run(args: argparse.Namespace) -> int:
    from popek.isa import language
    from popek.isa.classify import Classifier
    from popek.isa.theorem import check
    from popek.loaders import load
    from popek.scan import scan_image
    from popek.scan.document import ScanDocument
    from popek.scan.render import render

    if not (args.samples / "bin" / "vmdetect").exists():
        raise BadInput(f"{args.samples}: bundled samples not found (run from a source checkout, or pass --samples)")
    isa = language.bundled()

    emit(_section("1. Popek & Goldberg's theorems: can trap-and-emulate virtualize the ISA?   (popek theorem MODEL)"))
    for model in ("ia32", "ia32-umip", "vtx", "sun4v"):
        r = check(isa, model)
        names = " ".join(v.instruction.name for v in r.theorem1_violations)
        emit(f"{model:10} Theorem 1 {'holds' if not names else 'FAILS'}"
             f"{': ' + names if names else ''}\n{'':10} -> {r.conclusion}")

    emit(_section("2. A VM-aware binary: which instructions escape the monitor, and why   (popek scan FILE)"))
    image = load(str(args.samples / "bin" / "vmdetect"))
    report = scan_image(image, Classifier(isa), "linear")
    emit(render(ScanDocument(files=(report,)), "text"))

    _guests(args)
    emit("\nNext: `popek diff samples/guests/store_tables.s --monitor trap` (which instruction broke, and how), "
         "`popek theorem ia32`, `popek isa ia32`, `popek scan --help`, `popek compare --help`.")
    return 0


def _guests(args: argparse.Namespace) -> None:
    """Sample guests under the monitors (filled in as monitors land)."""
    try:
        from popek.experiments.compare import demo_table
    except ModuleNotFoundError:
        return
    emit(_section("3. The same guests on the bare machine and under each monitor   (popek compare GUEST)"))
    emit(demo_table(args.samples))
