"""Argument types the commands share. Each checks one value when the command line is parsed, so that a bad
value is a one-line usage error (exit status 2) before any work starts, never a traceback later."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

ArgumentType = Callable[[str], object]


def integer(text: str) -> int:
    """A number, decimal or with a 0x/0o/0b prefix."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def in_range(low: int, high: int | None = None, unit: str = "") -> ArgumentType:
    """A number between ``low`` and ``high`` (inclusive; no upper bound when None)."""
    def check(text: str) -> int:
        value = integer(text)
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}{unit}, not {text}")
        return value
    return check


# An instruction budget: a run needs at least one instruction to mean anything.
budget = in_range(1, unit=" instructions")
count = in_range(1)
address = in_range(0, 0xFFFFFFFF)


def existing_directory(text: str) -> Path:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    return Path(text)


def add_campaign(b: argparse.ArgumentParser, examples: int, what: str, seed: str = "random seed") -> None:
    """--examples, --seed and --jobs of a benchmark that runs many generated or mutated cases."""
    b.add_argument("--examples", type=count, default=examples, help=f"{what} (default {examples})")
    b.add_argument("--seed", type=in_range(0), default=0, help=f"{seed} (default 0: the same {what} every run)")
    b.add_argument("--jobs", type=in_range(1, 256), default=os.cpu_count() or 1,
                   help="processes (default: one per CPU)")


def output_directory(text: str) -> str:
    """A folder to write files into: an existing writable directory, or a new one in an existing writable
    directory (created when the files are written)."""
    if os.path.isdir(text):
        if not os.access(text, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text}: directory is not writable")
        return text
    if os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot be created (no writable directory {parent})")
    return text


def output_file(*suffixes: str) -> ArgumentType:
    """A file to write: its directory exists and is writable, it is not a directory, and its name ends
    with one of ``suffixes`` when given (the format is chosen by the suffix)."""
    def check(text: str) -> str:
        if text == "-":
            return text
        folder = os.path.dirname(os.path.abspath(text))
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"{text} is a directory")
        if not os.path.isdir(folder):
            raise argparse.ArgumentTypeError(f"{text}: no such directory {folder}")
        if not os.access(folder, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text}: directory {folder} is not writable")
        if suffixes and not text.lower().endswith(suffixes):
            raise argparse.ArgumentTypeError(f"{text}: the name must end with {' or '.join(suffixes)}")
        return text
    return check


def monitor_name(text: str) -> str:
    """The name of a monitor popek has (popek.monitors.MONITORS) and can load."""
    from popek.errors import UsageError
    from popek.monitors import monitor_class
    try:
        monitor_class(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def monitor_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of at least one monitor name, each one popek has."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("is empty: give at least one monitor")
    for name in names:
        monitor_name(name)
    return names


def profile(text: str) -> str:
    """A bundled cost profile's name or a profile file that parses (popek.cost)."""
    from popek.cost import load
    from popek.errors import PopekError
    try:
        load(text)
    except PopekError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
