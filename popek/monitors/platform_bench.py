"""What the benchmarks of the ported platforms (`popek bench pv`, `popek bench sun4v`) measure alike.

- ``per_call_us``: µs of this model per monitor entry of one kind, a loop of N entries against its empty twin
  (the same loop assembled with ``EMPTY`` defined), best of three wall times each, divided by the entries
  counted — so the loop's own instructions and the run's set-up cancel out;
- ``entries_table``: monitor entries (``popek.events.monitor_entries``) per sample guest and monitor, each
  monitor on its platform's build (``platform_defines``), with a ``*`` where the run did not end as the
  native build did (these guests encode their own checks in their exit code).
Wall times are this Python model's on this host, not real hardware's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent.parent / "samples"


def best_of(guest, monitor: str, runs: int = 3, profile: str | None = "modern"):
    """(best wall seconds of ``runs`` runs, the first run's result)."""
    from popek.monitors import run_guest
    results = [run_guest(guest, monitor=monitor, profile=profile) for _ in range(runs)]
    return min(r.wall_seconds for r in results), results[0]


def ended_as_native(result, native) -> bool:
    """The run ended with the native build's code, the ported end (``mach_exit``) counting as the exit port."""
    from popek.machine.result import PORTED_EXITS
    return (result.exit.code == native.exit.code
            and PORTED_EXITS.get(result.exit.reason, result.exit.reason) == native.exit.reason)


def per_call_us(source: str, n: int, monitor: str, defines: dict, kind: str, name: str,
                profile: str | None = "modern") -> tuple[float, object]:
    """µs per ``kind``/``name`` event of a loop of ``n`` (``source`` with ``{n}``, ``.ifndef EMPTY`` around the
    call), and the full loop's result."""
    from popek.asm import assemble_text
    from popek.machine.guest import Guest

    def loop(empty: bool) -> Guest:
        program = assemble_text(source.format(n=n), defines={**defines, **({"EMPTY": 1} if empty else {})},
                                include_dirs=(str(SAMPLES / "guests"),))
        return Guest(f"{name}-loop", ((program.origin, bytes(program.image)),), program.entry, "asm")

    full, result = best_of(loop(False), monitor, profile=profile)
    empty, _ = best_of(loop(True), monitor, profile=profile)
    return (full - empty) / result.events[kind][name] * 1e6, result


@dataclass(frozen=True)
class EntriesRow:
    guest: str
    native: object                 # the native build's result under native
    results: dict                  # monitor -> result on its platform's build

    def entries(self, monitor: str) -> int:
        from popek.events import monitor_entries
        return monitor_entries(self.results[monitor].events)

    def kinds(self, monitor: str, kinds: tuple[str, ...]) -> str:
        events = self.results[monitor].events
        return ", ".join(f"{k} {sum(events[k].values())}" for k in kinds if events.get(k)) or "-"


def entries_table(guests: tuple[str, ...], monitors: tuple[str, ...], kinds_of: str, kinds: tuple[str, ...],
                  profile: str | None = "modern") -> tuple[list[str], list[EntriesRow]]:
    """The table's lines (a header, one line per guest, the footnote) and its rows."""
    from popek.machine.guest import load_guest
    from popek.monitors import platform_defines
    lines = [f"  {'guest':18} " + " ".join(f"{m:>8}" for m in monitors) + f"   {kinds_of} kinds"]
    rows = []
    for name in guests:
        path = str(SAMPLES / "guests" / f"{name}.s")
        native = best_of(load_guest(path), "native", 1, profile)[1]
        results = {m: best_of(load_guest(path, defines=platform_defines(m) or None), m, 1, profile)[1]
                   for m in monitors}
        row = EntriesRow(name, native, results)
        rows.append(row)
        cells = " ".join(f"{row.entries(m):>7,}{'' if ended_as_native(results[m], native) else '*'}"
                         for m in monitors)
        lines.append(f"  {name:18} {cells}   {row.kinds(kinds_of, kinds)}")
    lines.append("  (* the run did not end as the native build did: the technique diverges on this guest)")
    return lines, rows
