"""Text output helpers shared by the commands: a rich console that renders into a string (fixed width, no
colour unless stdout is a terminal), a writer that ends output with one newline, and the encoding error
handler that lets any text reach any stream."""
from __future__ import annotations

import codecs
import io
import sys

from rich.console import Console

WIDTH = 120


def console(width: int = WIDTH) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    colour = "auto" if sys.stdout.isatty() else None
    return Console(file=buf, width=width, color_system=colour, force_terminal=bool(colour),
                   highlight=False, soft_wrap=False), buf


def emit(text: str, stream=None) -> None:
    stream = stream or sys.stdout
    stream.write(text if text.endswith("\n") else text + "\n")


# Typography popek prints, spelled in ASCII for a stream that cannot encode it (PYTHONIOENCODING=ascii, a C
# locale). A file name that is not UTF-8 reaches Python as lone surrogates (PEP 383): its original bytes are
# written back, so the name printed is the name on disk.
_ASCII = {"\u2014": "--", "\u2013": "-", "\u2026": "...", "\u2192": "->", "\u2190": "<-", "\u00b5": "u",
          "\u00d7": "x", "\u2264": "<=", "\u2265": ">=", "\u2248": "~", "\u2019": "'", "\u201c": '"', "\u201d": '"'}
ERRORS = "popek-text"


def _tolerant(exc: UnicodeError):
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for ch in exc.object[exc.start:exc.end]:
        if 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(ord(ch) - 0xDC00)
        else:
            out += _ASCII.get(ch, "?").encode("ascii")
    return bytes(out), exc.end


codecs.register_error(ERRORS, _tolerant)


def tolerant_streams() -> None:
    """Let stdout and stderr write whatever popek prints, whatever their encoding."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=ERRORS)


def encode(text: str) -> bytes:
    """UTF-8 for a file, with file names that are not UTF-8 written back as their original bytes."""
    return text.encode("utf-8", ERRORS)
