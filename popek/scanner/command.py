"""`popek scan FILE...`: exit 0 when no sensitive-unprivileged instruction is found, 1 when some are,
2 on bad input (DESIGN §3.2)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from popek.cli import EXIT_BAD_INPUT, EXIT_FOUND, EXIT_OK
from popek.errors import BadInput, UsageError
from popek.isa import language
from popek.isa.classify import Classifier
from popek.loaders import parse_region_spec
from popek.scanner import scan_paths
from popek.scanner.document import ScanDocument
from popek.scanner.engine import STRATEGIES

FORMATS = ("text", "json", "sarif", "csv")


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="FILE", help="files or directories (scanned recursively)")
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("--strategy", choices=STRATEGIES, default="linear",
                   help="linear: sweep every executable region like objdump -d (default; fast, complete, may "
                        "decode data as code); recursive: also follow control flow from entry points and "
                        "symbols and mark each finding reachable or not")
    p.add_argument("--mode", type=int, choices=(16, 32, 64), help="decode mode for raw input")
    p.add_argument("--base", type=_int, default=0, help="address of the first byte of raw input (default 0)")
    p.add_argument("--region", action="append", default=[], metavar="START:END:MODE",
                   help="raw input: decode addresses START..END in MODE (repeatable; addresses are file offset + --base)")
    p.add_argument("--raw", action="store_true", help="treat every file as raw code, even ELF or PE")
    p.add_argument("--extended", action="store_true",
                   help="also report the extended set (int3, syscall, sysenter, swapgs, VMX/SVM, ...)")
    p.add_argument("--isa", metavar="FILE", help="ISA description to classify with (default: the bundled IA-32 one)")
    p.add_argument("--model", default="ia32", help="model whose verdicts explain each finding (default ia32)")
    p.add_argument("--load", metavar="JSON", help="re-render a saved `--format json` result instead of scanning")
    p.add_argument("-o", "--output", metavar="FILE", help="write the report here instead of standard output")


def run(args: argparse.Namespace) -> int:
    from popek.scanner.render import render

    if args.load:
        doc = _load_saved(args.load)
    else:
        if not args.paths:
            raise UsageError("give at least one FILE or directory to scan")
        regions = [parse_region_spec(s) for s in args.region] or None
        classifier = Classifier(language.load(args.isa), args.model, extended=args.extended)
        doc = scan_paths(args.paths, classifier, strategy=args.strategy, mode=args.mode, base=args.base,
                         regions=regions, raw=args.raw)
    text = render(doc, args.format)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    for report in doc.files:
        if report.error is not None:
            print(f"popek scan: error: {report.path}: {report.error}", file=sys.stderr)
        for warning in report.warnings:
            print(f"popek scan: warning: {report.path}: {warning}", file=sys.stderr)
    for path in doc.skipped:
        print(f"popek scan: skipped: {path}: not an ELF or PE binary", file=sys.stderr)
    if doc.has_errors:
        return EXIT_BAD_INPUT
    return EXIT_FOUND if doc.sensitive_unprivileged else EXIT_OK


def _load_saved(path: str) -> ScanDocument:
    try:
        return ScanDocument.from_dict(json.loads(Path(path).read_text()))
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{path}: not a saved popek scan (--format json): {exc}") from None
