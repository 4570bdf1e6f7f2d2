"""Text output helpers shared by the commands: a rich console that renders into a string (fixed width, no
colour unless stdout is a terminal), and a writer that ends output with one newline."""
from __future__ import annotations

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
