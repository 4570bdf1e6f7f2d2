"""popek as a library: the functions behind every command, for notebooks and scripts.

    import popek
    report = popek.scan(["vmdetect.exe"])          # ScanDocument: .files, .to_dict(), .to_dataframe()
    guest = popek.assemble("samples/guests/flags.s")
    result = popek.run(guest, monitor="bt")         # RunResult: .exit, .console, .events, .to_dict()
    popek.diff(guest, "trap")                        # the divergence report, the instructions named
    popek.compare([guest], profile="p4-2006")        # every monitor side by side
    popek.theorem("ia32")                            # Popek & Goldberg's theorems under a model
    popek.report([guest]).to_html()                  # the page `popek report` writes

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
         isa: str | os.PathLike | None = None, model: str = "ia32", internal_errors: bool = True):
    """Classify every instruction of ``paths`` (files or directories) in Popek-Goldberg terms.

    ``regions``: raw input's ``START:END:MODE`` strings (as ``popek scan --region``). Returns the
    ``ScanDocument`` (``.files``: one report per file with its findings and any error).
    ``internal_errors``: record a bug of popek's on one file as that file's error and go on (False: raise it,
    as ``popek --traceback scan`` does)."""
    from popek.isa import language
    from popek.isa.classify import Classifier
    from popek.loaders import parse_region_spec
    from popek.scanner import scan_paths
    from popek.scanner.engine import STRATEGIES

    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    files = _paths(paths)
    if not files:
        raise UsageError("give at least one FILE or directory to scan")
    spans = [parse_region_spec(s) for s in regions] if regions else None
    classifier = Classifier(language.load(isa), model, extended=extended)
    return scan_paths(files, classifier, strategy=strategy, mode=mode, base=base, regions=spans, raw=raw,
                      internal_errors=internal_errors)


def assemble(source, *, defines: dict | None = None, name: str | None = None, include_dirs=()):
    """A guest from popek assembly: ``source`` is a path to a ``.s``/``.S``/``.asm`` file or the program text
    itself (anything with a newline). ``defines`` are ``-D`` symbols (``{"PV": 1}``). Returns a ``Guest``
    (``.symbols``, ``.segments``, ``.to_dict()``). ``.include`` looks beside the source, then in
    ``include_dirs``."""
    from popek.asm import assemble_text
    from popek.machine.guest import SOURCE_SUFFIXES, Guest, load_guest

    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if text is None:
        raise UsageError(f"assemble: expected a path or program text, not {type(source).__name__}")
    if "\n" not in text:
        if not text.endswith(SOURCE_SUFFIXES):
            raise UsageError(f"assemble: {text} is not an assembly source ({', '.join(SOURCE_SUFFIXES)}); "
                             f"popek.run takes flat images and ELF32 files as they are")
        return load_guest(text, defines=defines, include_dirs=[os.fspath(d) for d in include_dirs])
    samples = Path(__file__).resolve().parent.parent / "samples" / "guests"
    dirs = [os.fspath(d) for d in include_dirs] + ([os.fspath(samples)] if samples.is_dir() else [])
    program = assemble_text(text, name=name or "<input>", defines=defines, include_dirs=dirs)
    return Guest(name or "<text>", ((program.origin, bytes(program.image)),), program.entry, "asm",
                 dict(program.symbols))


def _is_guest(guest) -> bool:
    from popek.machine.guest import Guest

    return isinstance(guest, Guest)


def _guest(guest, ram_size: int | None = None):
    """A loaded guest, a path to one (flat image, ELF32, assembly source), or a UsageError."""
    from popek.machine.guest import load_guest
    from popek.machine.memory import RAM_DEFAULT

    if _is_guest(guest):
        return guest
    if not isinstance(guest, (str, os.PathLike)):
        raise UsageError(f"expected a guest (popek.assemble) or a path to one, not {type(guest).__name__}")
    return load_guest(os.fspath(guest), ram_size=ram_size or RAM_DEFAULT)


def _budget(max_instructions: int | None) -> int:
    from popek.monitors.base import DEFAULT_BUDGET

    if max_instructions is None:
        return DEFAULT_BUDGET
    if not isinstance(max_instructions, int) or max_instructions < 0:
        raise UsageError(f"max_instructions must be a non-negative integer, not {max_instructions!r}")
    return max_instructions


def _ram(ram_size: int | None) -> int:
    from popek.machine.memory import MIB, RAM_DEFAULT, RAM_MAX

    if ram_size is None:
        return RAM_DEFAULT
    if not isinstance(ram_size, int) or ram_size % MIB or not MIB <= ram_size <= RAM_MAX:
        raise UsageError(f"ram_size must be whole MiB between 1 and {RAM_MAX // MIB} MiB (in bytes), "
                         f"not {ram_size!r}")
    return ram_size


def run(guest, monitor: str = "native", *, max_instructions: int | None = None, ram_size: int | None = None,
        umip: bool = False, profile="modern", **options):
    """Run ``guest`` on a fresh machine under ``monitor`` (``popek.monitors.MONITORS``), priced on the cost
    ``profile`` (a name, a path, a loaded ``Profile``, or None for no modelled cycles); monitor options
    (``ring=1``, ``direct_user=True``, ``controls="vtx-2005"``, ...) as keywords. ``ram_size`` in bytes.
    Returns the ``RunResult`` (``.to_dict()`` is ``popek run --format json``)."""
    from popek.monitors import get_monitor, run_guest

    ram = _ram(ram_size)
    budget = _budget(max_instructions)
    get_monitor(monitor, **options)                 # bad monitor, option or control set: before the guest loads
    if profile is not None:
        from popek.cost.profile import Profile, load as load_profile
        if not isinstance(profile, Profile):
            profile = load_profile(os.fspath(profile))
    loaded = guest if _is_guest(guest) else _guest(guest, ram)
    return run_guest(loaded, monitor=monitor, max_instructions=budget, ram_size=ram, umip=umip, profile=profile,
                     **options)


def diff(guest, monitor: str = "trap", *, max_instructions: int | None = None, ram_size: int | None = None,
         umip: bool = False, **options):
    """Run ``guest`` natively and under ``monitor``; the report says whether it computed the same thing
    (console, exit, state and guest RAM; a run that ends on its budget is undecided) and names the sensitive
    instructions that saw different state."""
    from popek.experiments import divergence
    from popek.monitors import get_monitor

    budget = _budget(max_instructions)
    ram = _ram(ram_size)
    get_monitor(monitor, **options)
    return divergence.diff(_guest(guest, ram), monitor, max_instructions=budget, options=options,
                           ram_size=ram, umip=umip)


def _guests_and_monitors(guests, monitors):
    """compare's and report's arguments: one guest or several (paths stay paths: a source is built once per
    platform, -D PV for pv), and monitors as a list or a comma-separated string."""
    items = [guests] if isinstance(guests, (str, os.PathLike)) or _is_guest(guests) else list(guests)
    if not items:
        raise UsageError("give at least one guest")
    if isinstance(monitors, str):
        monitors = [m.strip() for m in monitors.split(",") if m.strip()]
    # Paths stay paths: compare builds an assembly source once per platform (-D PV for pv).
    for g in items:
        if not _is_guest(g) and not isinstance(g, (str, os.PathLike)):
            raise UsageError(f"expected guests (popek.assemble) or paths, not {type(g).__name__}")
    return [g if _is_guest(g) else os.fspath(g) for g in items], monitors


def compare(guests, monitors: Iterable[str] | None = None, profile: str | None = None, *,
            max_instructions: int | None = None):
    """The same guests natively (the reference) and under every monitor (or ``monitors``), side by side, with
    modelled cycles on ``profile`` (default ``modern``). Returns a ``Comparison``."""
    from popek.cost import DEFAULT
    from popek.experiments import compare as comparison

    items, monitors = _guests_and_monitors(guests, monitors)
    return comparison.compare(items, None if monitors is None else tuple(monitors), _budget(max_instructions),
                              profile or DEFAULT)


def report(guests, monitors: Iterable[str] | None = None, profile: str | None = None, *,
           max_instructions: int | None = None):
    """What ``popek report`` writes: every guest natively and under every monitor (or ``monitors``), traced
    instruction by instruction. Returns a ``ReportDocument``: ``.to_html()`` is the self-contained page, and a
    notebook shows its comparison table."""
    from popek.experiments import report as reports

    items, monitors = _guests_and_monitors(guests, monitors)
    return reports.build(items, None if monitors is None else tuple(monitors), profile, _budget(max_instructions))


def theorem(model: str | None = None, isa: str | os.PathLike | None = None):
    """Popek & Goldberg's Theorems 1 and 3 for ``model`` (default: the description's first, ia32 for the
    bundled one) of the ISA description ``isa`` (default: the bundled IA-32 one); the ``TheoremResult``
    lists the instructions that break each and why (``.to_dict()`` is ``popek theorem --format json``)."""
    from popek.isa import language, theorem as theorems

    description = language.load(isa)
    name = theorems.default_model(description, model)
    if name not in description.models:
        raise UsageError(f"unknown model {name!r} (known: {', '.join(description.models)})")
    return theorems.check(description, name)
