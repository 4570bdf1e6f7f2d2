"""`popek scan FILE...`: exit 0 when no sensitive-unprivileged instruction is found, 1 when some are,
2 on bad input (DESIGN §3.2)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from popek.cli import EXIT_BAD_INPUT, EXIT_FOUND, EXIT_OK
from popek.errors import BadInput, UsageError
from popek.loaders import ADDRESS_LIMIT, read_file
from popek.scanner.document import ScanDocument
from popek.scanner.engine import STRATEGIES
from popek.textout import encode

FORMATS = ("text", "json", "sarif", "csv")


def _int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < ADDRESS_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is not an address (0 to 0x{ADDRESS_LIMIT - 1:x})")
    return value


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="FILE", help="files or directories (scanned recursively)")
    p.add_argument("--format", choices=FORMATS, default="text")
    scan = p.add_argument_group("scanning (not with --load)")
    scan.add_argument("--strategy", choices=STRATEGIES, default="linear",
                      help="linear: sweep every executable region like objdump -d (default; fast, complete, may "
                           "decode data as code); recursive: also follow control flow from entry points and "
                           "symbols and mark each finding reachable or not")
    scan.add_argument("--mode", type=int, choices=(16, 32, 64), help="decode mode for raw input")
    scan.add_argument("--base", type=_int, default=0, help="address of the first byte of raw input (default 0)")
    scan.add_argument("--region", action="append", default=[], metavar="START:END:MODE",
                      help="raw input: decode addresses START..END in MODE (repeatable; addresses are file offset + "
                           "--base)")
    scan.add_argument("--raw", action="store_true", help="treat every file as raw code, even ELF or PE")
    scan.add_argument("--extended", action="store_true",
                      help="also report the extended set (int3, syscall, sysenter, swapgs, VMX/SVM, ...)")
    scan.add_argument("--isa", metavar="FILE", help="ISA description to classify with (default: the bundled IA-32 one)")
    scan.add_argument("--model", default="ia32", help="model whose verdicts explain each finding (default ia32)")
    p.add_argument("--load", metavar="JSON", help="re-render a saved `--format json` result instead of scanning "
                                                  "(with --format and -o only)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the report here instead of standard output")
    p.add_argument("--details", action="store_true",
                   help="text: with several files, the per-file findings after the summary table")
    # What --load cannot be combined with: every scanning option, at its default.
    p.set_defaults(_scan_defaults={a.dest: a.default for a in scan._group_actions})


def run(args: argparse.Namespace) -> int:
    from popek.scanner.render import TEXT_WIDTH, render

    if args.output:
        _check_output(args.output)
    if args.load:
        given = [f"--{dest}" for dest, default in args._scan_defaults.items() if getattr(args, dest) != default]
        if args.paths or given:
            what = ", ".join((["FILE arguments"] if args.paths else []) + given)
            raise UsageError(f"--load re-renders a saved result; it cannot be combined with {what}")
        doc = _load_saved(args.load)
    else:
        from popek import api
        doc = api.scan(args.paths, strategy=args.strategy, mode=args.mode, base=args.base, regions=args.region,
                       raw=args.raw, extended=args.extended, isa=args.isa, model=args.model,
                       internal_errors=not args.traceback)
    # The terminal's width (COLUMNS, or the tty's); a file or a pipe gets the fixed default.
    width = TEXT_WIDTH if args.output else shutil.get_terminal_size((TEXT_WIDTH, 24)).columns
    text = render(doc, args.format, details=args.details or None, width=max(60, width))
    text = text if text.endswith("\n") else text + "\n"
    if args.output:
        try:
            Path(args.output).write_bytes(encode(text))
        except OSError as exc:
            raise BadInput(f"cannot write {args.output}: {exc.strerror or exc}") from None
    else:
        sys.stdout.write(text)
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


def _check_output(path: str) -> None:
    """Refuse an output path that cannot be written before scanning, not after."""
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise UsageError(f"-o {path}: is a directory; give a file name")
    if not parent.is_dir():
        raise UsageError(f"-o {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"-o {path}: permission denied")


def _load_saved(path: str) -> ScanDocument:
    data = read_file(path, what="--load")
    try:
        return ScanDocument.from_dict(json.loads(data))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadInput(f"{path}: not a saved popek scan (--format json): {exc}") from None
