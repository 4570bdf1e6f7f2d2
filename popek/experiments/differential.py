"""Differential runs: the same guest under two monitors, and what differs between the two results.

``compare(guest, "native", "emulate")`` runs the guest on two fresh machines and returns ``None`` when the
results agree, else a ``Divergence`` whose ``report()`` says what differs, readably: the exit (reason and
code), the console (the first differing offset with context), every visible state field of DESIGN §3.4
(``RunResult.to_dict()["state"]``), guest RAM (the first differing byte ranges) and, where meaningful,
``guest_instructions``. Event counts are never
compared: they describe what each monitor did, which is the point of having several.

``locate=True`` adds where the runs part: a bisection over the instruction budget finds the smallest
number of instructions after which the two visible states (or the guest RAM) differ, and names the
instruction there. It needs both monitors to count instructions the same way, and costs about
2·log2(instructions) extra runs, so it is for reports, not for property tests.

A guest is anything ``popek.monitors.run_guest`` takes (a path or a ``popek.machine.Guest``), or a
``popek.experiments.guestgen.GuestSpec``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from popek.experiments.divergence import memory_differences
from popek.machine.result import STATE_KEYS, RunResult

DEFAULT_BUDGET = 5_000_000


@dataclass(frozen=True)
class Difference:
    what: str            # "exit", "console", "memory", "guest_instructions", "state.<key>"
    a: Any               # "memory": the lines that name the differing ranges (b: None)
    b: Any

    def render(self, monitor_a: str, monitor_b: str) -> str:
        if self.what == "console":
            return _console_diff(self.a, self.b, monitor_a, monitor_b)
        if self.what == "memory":
            return "\n  ".join(self.a)
        return f"{self.what}: {monitor_a} {_show(self.a)}, {monitor_b} {_show(self.b)}"


@dataclass
class Divergence:
    """Two runs of one guest that do not agree."""

    guest: str
    monitor_a: str
    monitor_b: str
    differences: list[Difference]
    result_a: RunResult
    result_b: RunResult
    where: str | None = None             # from locate=True: the first instruction after which they differ
    source: str | None = field(default=None, repr=False)    # the guest's source, when it has one

    @property
    def fields(self) -> list[str]:
        return [d.what for d in self.differences]

    @property
    def signature(self) -> tuple[str, ...]:
        """What kind of divergence this is (the differing fields, state registers grouped), to group many."""
        return tuple(sorted({d.what for d in self.differences}))

    def report(self) -> str:
        a, b = self.monitor_a, self.monitor_b
        lines = [f"{a} and {b} diverge on {self.guest}:"]
        lines += [f"  {d.render(a, b)}" for d in self.differences]
        for name, r in ((a, self.result_a), (b, self.result_b)):
            why = f" ({r.exit.why})" if r.exit.why else ""
            lines.append(f"  {name}: exit {r.exit.reason} {r.exit.code}{why} after {r.guest_instructions} "
                         f"instructions")
        if self.where:
            lines.append(f"  first divergence: {self.where}")
        return "\n".join(lines)

    __str__ = report


def _show(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:#x}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _console_diff(a: str, b: str, name_a: str, name_b: str, context: int = 30) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, at - context)
    return (f"console differs at offset {at} (lengths {len(a)}, {len(b)}):\n"
            f"    {name_a}: {a[start:at + context]!r}\n    {name_b}: {b[start:at + context]!r}")


def differences(a: RunResult, b: RunResult, instructions: bool = True) -> list[Difference]:
    """Every guest-visible difference between two results of the same guest."""
    out = []
    if (a.exit.reason, a.exit.code) != (b.exit.reason, b.exit.code):
        out.append(Difference("exit", f"{a.exit.reason} {a.exit.code}", f"{b.exit.reason} {b.exit.code}"))
    if a.console != b.console:
        out.append(Difference("console", a.console, b.console))
    if a.memory is not None and b.memory is not None and a.memory.digest != b.memory.digest:
        out.append(Difference("memory", tuple(memory_differences(a.memory, b.memory)[1]), None))
    for key in STATE_KEYS:
        if a.state.get(key) != b.state.get(key):
            out.append(Difference(f"state.{key}", a.state.get(key), b.state.get(key)))
    if instructions and a.guest_instructions != b.guest_instructions:
        out.append(Difference("guest_instructions", a.guest_instructions, b.guest_instructions))
    return out


def _as_guest(guest):
    """(Guest or path, name, source text or None)."""
    text = getattr(guest, "text", None)
    if hasattr(guest, "guest") and callable(guest.guest) and text is not None:      # a GuestSpec
        g = guest.guest()
        return g, g.name, text
    name = getattr(guest, "name", None) or str(guest)
    return guest, name, None


def run(guest, monitor: str, max_instructions: int = DEFAULT_BUDGET, ram_size: int | None = None,
        **options) -> RunResult:
    from popek.monitors import run_guest
    return run_guest(guest, monitor, max_instructions=max_instructions, ram_size=ram_size, **options)


def compare(guest, monitor_a: str = "native", monitor_b: str = "emulate", *, instructions: bool = True,
            max_instructions: int = DEFAULT_BUDGET, ram_size: int | None = None, locate: bool = False,
            options_a: dict | None = None, options_b: dict | None = None) -> Divergence | None:
    """Run ``guest`` under both monitors (fresh machines) and return how the results differ, or None.

    ``instructions=False`` leaves ``guest_instructions`` out, for a monitor that legitimately executes a
    different number of guest instructions. ``get_monitor`` errors (an unknown monitor, one not built
    yet) propagate as ``UsageError``.
    """
    g, name, text = _as_guest(guest)
    a = run(g, monitor_a, max_instructions, ram_size, **(options_a or {}))
    b = run(g, monitor_b, max_instructions, ram_size, **(options_b or {}))
    diffs = differences(a, b, instructions)
    if not diffs:
        return None
    divergence = Divergence(name, monitor_a, monitor_b, diffs, a, b, source=text)
    if locate:
        divergence.where = locate_divergence(g, monitor_a, monitor_b, min(a.guest_instructions,
                                             b.guest_instructions), ram_size, options_a, options_b)
    return divergence


# --- locating the first divergent instruction ---------------------------------------------------------------
def _snapshot(guest, monitor: str, budget: int, ram_size: int | None, options: dict | None):
    """(visible state, RAM digest, exit, eip, code at eip) after ``budget`` instructions under ``monitor``."""
    from popek.machine.guest import Guest, load_guest
    from popek.machine.machine import Machine
    from popek.machine.memory import RAM_DEFAULT
    from popek.monitors import get_monitor
    from popek.monitors.base import run as run_loop
    ram = RAM_DEFAULT if ram_size is None else ram_size
    if not isinstance(guest, Guest):
        guest = load_guest(guest, ram_size=ram)
    machine = Machine(ram_size=ram)
    machine.load(guest)
    result = run_loop(machine, get_monitor(monitor, **(options or {})), budget)
    digest = hashlib.sha256(bytes(machine.uc.mem_read(0, ram))).hexdigest()
    return result, digest, machine


def _describe(machine, eip: int) -> str:
    from popek.decode import decode_at
    try:
        code = machine.read_linear(eip, 15)
    except Exception:                       # noqa: BLE001 - any unreadable EIP is just reported as such
        return f"{eip:#010x}: (unreadable)"
    insn = decode_at(code, 0, eip, 32)
    return f"{eip:#010x}: {insn.text if insn else code[:4].hex() + '... (undecodable)'}"


def locate_divergence(guest, monitor_a: str, monitor_b: str, upper: int, ram_size: int | None = None,
                      options_a: dict | None = None, options_b: dict | None = None) -> str:
    """Bisect on the instruction budget for the first point where visible state or RAM differ."""
    def same(n: int) -> bool:
        ra, da, _ = _snapshot(guest, monitor_a, n, ram_size, options_a)
        rb, db, _ = _snapshot(guest, monitor_b, n, ram_size, options_b)
        return da == db and not differences(ra, rb, instructions=True)

    if upper <= 0 or same(upper):
        return f"the states agree after {upper} instructions: the runs part at the end (exit or console)"
    lo, hi = 0, upper                       # same(lo) holds (nothing ran), same(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if same(mid):
            lo = mid
        else:
            hi = mid
    ra, _, machine = _snapshot(guest, monitor_a, lo, ram_size, options_a)
    return (f"after {hi} instructions; instruction {hi} under {monitor_a} is at "
            f"{_describe(machine, ra.state['eip'])}")


# --- many generated guests ----------------------------------------------------------------------------------
@dataclass
class FuzzReport:
    """What ``fuzz`` found: how many generated guests ran, how many diverged, the first few shrunk."""

    reference: str
    monitor: str
    examples: int = 0
    divergent: int = 0
    seconds: float = 0.0                                # running the examples (not shrinking)
    shrink_seconds: float = 0.0
    seed: int = 0
    signatures: dict = field(default_factory=dict)     # signature -> count
    first: dict = field(default_factory=dict)          # signature -> the first GuestSpec that showed it
    shrunk: list = field(default_factory=list)         # Divergence of the shrunk guests (with .source)
    options: dict = field(default_factory=dict)         # the monitor's options (hvm: vendor, controls, control)

    def merge(self, other: FuzzReport) -> None:
        self.examples += other.examples
        self.divergent += other.divergent
        for sig, n in other.signatures.items():
            self.signatures[sig] = self.signatures.get(sig, 0) + n
        for sig, spec in other.first.items():
            self.first.setdefault(sig, spec)

    def render(self) -> str:
        rate = self.examples / self.seconds if self.seconds else 0.0
        given = " ".join(f"--{k} {v}" for k, vs in sorted(self.options.items())
                         for v in (vs if isinstance(vs, (list, tuple)) else (vs,)))
        lines = [f"popek bench differential: {self.reference} vs {self.monitor}{' ' + given if given else ''}, "
                 f"seed {self.seed}",
                 f"  examples run      {self.examples:,}",
                 f"  divergent         {self.divergent:,}"
                 + (f" ({100 * self.divergent / self.examples:.2f}%)" if self.examples else ""),
                 f"  wall              {self.seconds:.1f} s (+ {self.shrink_seconds:.1f} s shrinking)",
                 f"  examples/s        {rate:.1f}"]
        if self.signatures:
            lines.append("  divergences by differing fields:")
            for sig, n in sorted(self.signatures.items(), key=lambda kv: -kv[1]):
                lines.append(f"    {n:8,}  {', '.join(sig)}")
        for k, d in enumerate(self.shrunk, 1):
            lines.append(f"--- shrunk divergence {k} ---")
            lines.append(d.report())
            if d.source:
                lines.append("--- its source (save under tests/regressions/ as a .s file) ---")
                lines.append(d.source.rstrip())
        return "\n".join(lines)


def _fuzz_share(monitor: str, reference: str, examples: int, seed: int, batch: int, max_items: int,
                kinds: tuple | None = None, options: dict | None = None) -> FuzzReport:
    """Run ``examples`` generated guests in Hypothesis batches (a fresh search tree per batch bounds memory)."""
    import time

    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed

    from popek.experiments import guestgen

    report = FuzzReport(reference, monitor, seed=seed, options=dict(options or {}))
    strategy = guestgen.guests(max_items=max_items, kinds=kinds)
    started = time.perf_counter()
    done, b = 0, 0
    while done < examples:
        n = min(batch, examples - done)

        @fixed_seed(seed * 1_000_003 + b)
        @settings(max_examples=n, phases=[Phase.generate], database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one(spec):
            report.examples += 1
            d = compare(spec, reference, monitor, max_instructions=guestgen.BUDGET, options_b=options)
            if d is not None:
                report.divergent += 1
                report.signatures[d.signature] = report.signatures.get(d.signature, 0) + 1
                report.first.setdefault(d.signature, spec)

        before = report.examples
        one()
        done += max(1, report.examples - before)
        b += 1
    report.seconds = time.perf_counter() - started
    return report


def fuzz(monitor: str = "emulate", examples: int = 100_000, *, reference: str = "native", seed: int = 0,
         jobs: int = 1, batch: int = 1000, shrink_first: int = 3, max_items: int = 30,
         kinds: tuple | None = None, options: dict | None = None) -> FuzzReport:
    """Compare ``reference`` and ``monitor`` on ``examples`` generated guests; count divergences and shrink
    the first guest of each of the first ``shrink_first`` kinds of divergence (``guestgen.shrink``). With
    ``jobs`` > 1 the examples are split over processes with different seeds. ``options``: constructor
    arguments of ``monitor`` (hvm's vendor, controls, control), checked here before any guest runs."""
    import time

    from popek.experiments import guestgen
    from popek.monitors import get_monitor

    options = dict(options or {})
    get_monitor(reference)                              # an unknown or unbuilt monitor, a bad control: UsageError now
    get_monitor(monitor, **options)
    started = time.perf_counter()
    report = FuzzReport(reference, monitor, seed=seed, options=options)
    shares = [examples // jobs + (1 if k < examples % jobs else 0) for k in range(max(1, jobs))]
    if jobs <= 1:
        report.merge(_fuzz_share(monitor, reference, examples, seed, batch, max_items, kinds, options))
    else:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            parts = pool.starmap(_fuzz_share, [(monitor, reference, n, seed + k * 7919, batch, max_items, kinds,
                                                options) for k, n in enumerate(shares) if n])
        for part in parts:
            report.merge(part)
    report.seconds = time.perf_counter() - started
    for sig, spec in list(report.first.items())[:shrink_first]:
        def same_kind(candidate, sig=sig):
            d = compare(candidate, reference, monitor, max_instructions=guestgen.BUDGET, options_b=options)
            return d is not None and d.signature == sig
        small = guestgen.shrink(spec, same_kind)
        d = compare(small, reference, monitor, max_instructions=guestgen.BUDGET, locate=True, options_b=options)
        if d is not None:
            report.shrunk.append(d)
    report.shrink_seconds = time.perf_counter() - started - report.seconds
    return report
