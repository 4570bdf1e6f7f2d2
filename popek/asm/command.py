"""``popek asm SOURCE``: assemble a guest into a flat image (and optionally a listing)."""
from __future__ import annotations

import argparse
import os
import sys

from popek.asm.assemble import assemble_file, parse_define
from popek.errors import BadInput


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="guest assembly source (.s / .asm)")
    parser.add_argument("-o", "--output", metavar="OUT",
                        help="flat image to write (default: SOURCE with the extension .bin)")
    parser.add_argument("--listing", metavar="FILE", help="write a listing (address, bytes, source, symbols); "
                        "'-' for standard output")
    parser.add_argument("-D", dest="defines", metavar="NAME[=VALUE]", action="append", default=[],
                        help="define a symbol for .if/.ifdef and expressions (VALUE defaults to 1)")
    parser.add_argument("-I", dest="include_dirs", metavar="DIR", action="append", default=[],
                        help="also look for .include files here")


def run(args: argparse.Namespace) -> int:
    defines = dict(parse_define(d) for d in args.defines)
    program = assemble_file(args.source, defines=defines, include_dirs=args.include_dirs)
    output = args.output or os.path.splitext(args.source)[0] + ".bin"
    if os.path.abspath(output) == os.path.abspath(args.source):
        raise BadInput(f"refusing to overwrite the source {args.source} with the image")
    _write(output, program.image)
    if args.listing == "-":
        sys.stdout.write(program.listing_text())
    elif args.listing:
        _write(args.listing, program.listing_text().encode("utf-8"))
    print(f"wrote {output}: {len(program.image)} bytes at {program.origin:#010x}, entry {program.entry:#010x}"
          + (f"; listing {args.listing}" if args.listing and args.listing != "-" else ""))
    return 0


def _write(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
