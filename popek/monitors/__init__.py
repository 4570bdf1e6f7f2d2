"""Monitors: one module per technique behind one interface (``popek.monitors.base.MonitorOps``).

``MONITORS`` maps a name (DESIGN §3.5) to the module and class that implement it; a new monitor is one
entry here. Modules are imported when a monitor is asked for, so a monitor still being written cannot
break the others.
"""
from __future__ import annotations

import importlib
import inspect

from popek.errors import UsageError

MONITORS: dict[str, tuple[str, str]] = {
    "native": ("popek.monitors.native", "Native"),
    "trap": ("popek.monitors.trap", "TrapAndEmulate"),
    "emulate": ("popek.monitors.emulate", "Emulate"),
    "bt": ("popek.monitors.bt", "BinaryTranslation"),
    "pv": ("popek.monitors.pv", "ParaVirtual"),
    "hvm": ("popek.monitors.hvm", "HardwareAssisted"),
    "sun4v": ("popek.monitors.sun4v", "Sun4v"),
}


def platform_defines(name: str) -> dict[str, int]:
    """The -D symbols that build a source guest for monitor ``name``'s platform (samples/guests/platform.inc):
    ``{"PV": 1}`` for pv and ``{"SUN4V": 1}`` for sun4v, whose guests are ported; empty for the monitors that run unmodified guests."""
    return dict(getattr(monitor_class(name), "source_defines", {}))


def monitor_class(name: str) -> type:
    """The ops class of monitor ``name``; UsageError names the known ones."""
    if name not in MONITORS:
        raise UsageError(f"unknown monitor {name!r} (known: {', '.join(MONITORS)})")
    module, cls = MONITORS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise UsageError(f"monitor {name!r} is not built yet") from None
    return getattr(mod, cls)


def get_monitor(name: str, **options):
    """A fresh ops object for monitor ``name``. An option the monitor's constructor does not take is a
    UsageError that names it as the command-line flag (``direct_user`` -> ``--direct-user``); a bad value
    is the constructor's own UsageError."""
    cls = monitor_class(name)
    accepted = inspect.signature(cls).parameters
    foreign = [option for option in options if option not in accepted]
    if foreign:
        flags = " and ".join(f"--{option.replace('_', '-')}" for option in foreign)
        raise UsageError(f"{flags} does not apply to monitor {name!r}")
    return cls(**options)


def run_guest(guest, monitor: str = "native", max_instructions: int | None = None,
              ram_size: int | None = None, umip: bool = False, profile="modern", **options):
    """Load ``guest`` (a path or a ``popek.machine.Guest``) on a fresh machine and run it under ``monitor``;
    price the run on ``profile`` (a cost profile's name, path or ``Profile``; None: no modelled cycles).
    Raises KeyboardInterrupt instead of starting when Ctrl-C ended an earlier run (machine.interruptible)."""
    from popek.machine import interruptible
    from popek.machine.guest import Guest, load_guest
    if interruptible.pending():
        raise KeyboardInterrupt
    from popek.machine.machine import Machine
    from popek.machine.memory import RAM_DEFAULT
    from popek.monitors.base import DEFAULT_BUDGET, run
    ram = RAM_DEFAULT if ram_size is None else ram_size
    ops = get_monitor(monitor, **options)
    if not isinstance(guest, Guest):
        guest = load_guest(guest, ram_size=ram)
    machine = Machine(ram_size=ram, umip=umip)
    machine.load(guest)
    result = run(machine, ops, DEFAULT_BUDGET if max_instructions is None else max_instructions)
    if profile is not None:
        from popek.cost import apply
        apply(result, profile)
    return result
