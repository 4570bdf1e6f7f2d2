"""popek as a library: the functions behind every command, for notebooks and scripts.

    import popek
    report = popek.scan(["vmdetect.exe"])          # ScanDocument: .files, .to_dict(), .to_dataframe()
    guest = popek.assemble("samples/guests/flags.s")
    result = popek.run(guest, monitor="bt")         # RunResult: .exit, .console, .events, .to_dict()
    popek.diff(guest, "trap")                        # the divergence report, the instructions named
    popek.compare([guest], profile="p4-2006")        # every monitor side by side
    popek.theorem("ia32")                            # Popek & Goldberg's theorems under a model

Every result has ``to_dict()`` (the document the command prints with ``--format json``), and those that fit
a table show one in a notebook (``_repr_html_``) and give it to pandas (``to_dataframe()``, the
``notebook`` extra). Errors are the typed errors of ``popek.errors`` (``BadInput``, ``UsageError``,
``SourceError``), never ``SystemExit``. The commands call these functions; they add only argument parsing,
output formats and exit codes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from popek.errors import UsageError

def _paths(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def scan(paths, *, strategy: str = "linear", mode: int | None = None, base: int = 0,
         regions: Iterable[str] | None = None, raw: bool = False, extended: bool = False,
         isa: str | os.PathLike | None = None, model: str = "ia32"):
    """Classify every instruction of ``paths`` (files or directories) in Popek-Goldberg terms.

    ``regions``: raw input's ``START:END:MODE`` strings (as ``popek scan --region``). Returns the
    ``ScanDocument`` (``.files``: one report per file with its findings and any error)."""
    from popek.isa import language
    from popek.isa.classify import Classifier
    from popek.loaders import parse_region_spec
    from popek.scanner import scan_paths
    from popek.scanner.engine import STRATEGIES

    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    files = _paths(paths)
    if not files:
        raise UsageError("give at least one file or directory to scan")
    spans = [parse_region_spec(s) for s in regions] if regions else None
    classifier = Classifier(language.load(isa), model, extended=extended)
    return scan_paths(files, classifier, strategy=strategy, mode=mode, base=base, regions=spans, raw=raw)


def assemble(source, *, defines: dict | None = None, name: str | None = None):
    """A guest from popek assembly: ``source`` is a path to a ``.s`` file or the program text itself
    (anything with a newline). ``defines`` are ``-D`` symbols (``{"PV": 1}``). Returns a ``Guest``."""
    from popek.asm import assemble_file, assemble_text
    from popek.machine.guest import Guest, load_guest

    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if text is None:
        raise UsageError(f"assemble: expected a path or program text, not {type(source).__name__}")
    if "\n" not in text:
        return load_guest(text, defines=defines)
    samples = Path(__file__).resolve().parent.parent / "samples" / "guests"
    program = assemble_text(text, defines=defines, include_dirs=[samples] if samples.is_dir() else [])
    return Guest(name or "<text>", ((program.origin, bytes(program.image)),), program.entry, "asm",
                 dict(program.symbols))


def _guest(guest):
    from popek.machine.guest import Guest, load_guest

    return guest if isinstance(guest, Guest) else load_guest(os.fspath(guest))


def run(guest, monitor: str = "native", *, max_instructions: int | None = None, ram_size: int | None = None,
        umip: bool = False, profile: str | None = "modern", **options):
    """Run ``guest`` on a fresh machine under ``monitor`` (``popek.monitors.MONITORS``), priced on the cost
    ``profile``; monitor options (``ring=1``, ``direct_user=True``, ...) as keywords. Returns the
    ``RunResult``."""
    from popek.monitors import run_guest

    return run_guest(_guest(guest), monitor=monitor, max_instructions=max_instructions, ram_size=ram_size,
                     umip=umip, profile=profile, **options)


def diff(guest, monitor: str = "trap", *, max_instructions: int | None = None, **options):
    """Run ``guest`` natively and under ``monitor``; the report says whether it computed the same thing and
    names the sensitive instructions that saw different state."""
    from popek.experiments import divergence
    from popek.monitors.base import DEFAULT_BUDGET

    budget = DEFAULT_BUDGET if max_instructions is None else max_instructions
    return divergence.diff(_guest(guest), monitor, max_instructions=budget, options=options)


def compare(guests, monitors: Iterable[str] | None = None, profile: str | None = None, *,
            max_instructions: int | None = None):
    """The same guests natively (the reference) and under every monitor (or ``monitors``), side by side, with
    modelled cycles on ``profile`` (default ``modern``). Returns a ``Comparison``."""
    from popek.cost import DEFAULT
    from popek.experiments import compare as comparison

    loaded = [_guest(g) for g in ([guests] if isinstance(guests, (str, os.PathLike)) else guests)]
    return comparison.compare(loaded, None if monitors is None else tuple(monitors), max_instructions,
                              profile or DEFAULT)


def theorem(model: str = "ia32", isa: str | os.PathLike | None = None):
    """Popek & Goldberg's Theorems 1 and 3 for ``model`` of the ISA description ``isa`` (default: the
    bundled IA-32 one); the result lists the instructions that break each and why."""
    from popek.isa import language, theorem as theorems

    description = language.load(isa)
    if model not in description.models:
        raise UsageError(f"unknown model {model!r} (known: {', '.join(description.models)})")
    return theorems.check(description, model)
