"""`popek bench`: benchmarks that measure in one run and print ratios, never timed tests.

Each benchmark is a function in BENCHMARKS taking the parsed arguments and returning the report text.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import tempfile
import time

from popek.errors import UsageError
from popek.textout import emit


def _scan(args: argparse.Namespace) -> str:
    """`popek scan --strategy linear` against `objdump -d` on the same file, and whether they agree."""
    from popek.experiments.objdump_oracle import sites_from_listing
    from popek.isa import language
    from popek.isa.classify import Classifier
    from popek.loaders import load
    from popek.scan import scan_image
    from popek.scan.document import ScanDocument

    objdump = shutil.which("objdump")
    if objdump is None:
        raise UsageError("objdump (GNU binutils) is not installed; it is the baseline this benchmark compares with")
    t0 = time.perf_counter()
    image = load(args.file)
    report = scan_image(image, Classifier(language.bundled()), "linear")
    json.dumps(ScanDocument(files=(report,)).to_dict())  # what `popek scan --format json` produces
    popek_seconds = time.perf_counter() - t0
    popek_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    with tempfile.TemporaryFile("w+") as listing:
        t0 = time.perf_counter()
        subprocess.run([objdump, "-d", args.file], stdout=listing, stderr=subprocess.DEVNULL, check=True)
        objdump_seconds = time.perf_counter() - t0
        listing.seek(0)
        theirs = sites_from_listing(listing.read())
    ours = {(f.address, f.name) for f in report.findings}
    code_bytes = sum(len(r.data) for r in image.regions)
    agree = "identical" if ours == theirs else (
        f"popek only {len(ours - theirs)}, objdump only {len(theirs - ours)}: "
        f"{sorted(ours ^ theirs)[:5]}")
    return "\n".join([
        f"popek bench scan {args.file} ({image.format}, {code_bytes / 1e6:.1f} MB of code in "
        f"{len(image.regions)} regions, {report.instructions:,} instructions)",
        f"  objdump -d                  {objdump_seconds:8.2f} s",
        f"  popek scan (linear, json)   {popek_seconds:8.2f} s   {report.instructions / popek_seconds / 1e6:.2f} M instructions/s",
        f"  ratio popek / objdump       {popek_seconds / objdump_seconds:8.2f}",
        f"  popek peak memory           {popek_rss:8.0f} MiB (whole process)",
        f"  sites: popek {len(ours)}, objdump {len(theirs)}, common {len(ours & theirs)} ({agree})",
    ])


BENCHMARKS = {"scan": (_scan, "time popek scan --strategy linear against objdump -d on FILE")}


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (fn, help_text) in BENCHMARKS.items():
        b = sub.add_parser(name, help=help_text, description=help_text)
        if name == "scan":
            b.add_argument("file", metavar="FILE")
        b.set_defaults(_bench=fn)


def run(args: argparse.Namespace) -> int:
    emit(args._bench(args))
    return 0
