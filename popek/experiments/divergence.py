"""`popek diff GUEST --monitor M`: run a guest on the bare machine and under a monitor, report where what the
guest can see differs, and name the sensitive instructions responsible.

How the blame is found: before each run, the guest's loaded image is swept with the classifier, and a code
hook is put on exactly the sensitive-unprivileged instructions it contains (nothing else is slowed down).
Each time one executes, the observer records the state that instruction reads — the ISA description's
``reads`` list (GDTR, IDTR, LDTR, TR, CR0, EFLAGS.IF/IOPL, CPL, segments) — as the real machine holds it at
that moment. Pairing the two runs' records by (address, n-th execution) shows, for each instruction, what
the guest saw under the monitor against what the bare machine gave. Under a monitor that runs the guest
directly (``trap``) these hooks see the real, monitor-owned state, which is exactly what such an instruction
leaks; under a translating monitor the guest's instructions do not execute in place and nothing is recorded.
Instructions written at run time (not in the loaded image) are not observed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from unicorn import UC_HOOK_CODE

from popek.isa import language
from popek.isa.classify import Classifier
from popek.loaders import Region
from popek.scanner import engine
from popek.tabular import Tabular

# How to read, on the machine, each piece of state the description says an instruction reads.
_OBSERVE = {
    "GDTR": lambda m: "base={1:#010x} limit={2:#06x}".format(*m.table("gdtr")),
    "IDTR": lambda m: "base={1:#010x} limit={2:#06x}".format(*m.table("idtr")),
    "LDTR": lambda m: f"{m.table('ldtr')[0] & 0xFFFF:#06x}",
    "TR": lambda m: f"{m.table('tr')[0] & 0xFFFF:#06x}",
    "CR0": lambda m: f"{m.reg('cr0'):#010x}",
    "EFLAGS.IF": lambda m: str((m.reg("eflags") >> 9) & 1),
    "EFLAGS.IOPL": lambda m: str((m.reg("eflags") >> 12) & 3),
    "CPL": lambda m: str(m.reg("cs") & 3),
    "segments": lambda m: "cs={cs:#06x} ss={ss:#06x}".format(**m.registers(("cs", "ss"))),
}


@dataclass(frozen=True)
class Observation:
    address: int
    name: str
    text: str
    occurrence: int                 # 1 for the first execution of this address, 2 for the second, ...
    seen: tuple[tuple[str, str], ...]   # (state, value as the instruction read it)

    @property
    def key(self) -> tuple[int, int]:
        return self.address, self.occurrence


class Observer:
    """Records what the sensitive-unprivileged instructions of a loaded guest read, each time they run."""

    LIMIT = 10_000  # records kept per run: enough to find the first differences, bounded for looping guests

    def __init__(self, classifier: Classifier):
        self.classifier = classifier
        self.records: list[Observation] = []
        self._counts: dict[int, int] = {}
        self._sites: dict[int, tuple[str, str, tuple[str, ...]]] = {}

    def attach(self, machine) -> None:
        for address, data in machine.guest.segments:
            region = Region("guest", address, data, 32)
            findings, _ = engine.linear(region, self.classifier)
            for f in findings:
                if f.cls != "sensitive-unprivileged":
                    continue
                reads = tuple(s for s in self.classifier.isa.instructions[f.name].reads if s in _OBSERVE)
                self._sites[f.address] = (f.name, f.text, reads)
                machine.uc.hook_add(UC_HOOK_CODE, self._hook, machine, f.address, f.address)

    def _hook(self, uc, address: int, size: int, machine) -> None:
        if len(self.records) >= self.LIMIT:
            return
        name, text, reads = self._sites[address]
        n = self._counts[address] = self._counts.get(address, 0) + 1
        seen = tuple((state, _OBSERVE[state](machine)) for state in reads)
        self.records.append(Observation(address, name, text, n, seen))


@dataclass
class Report(Tabular):
    guest: str
    monitor: str
    native: dict
    other: dict
    differences: list[str] = field(default_factory=list)      # what the guest can see that differs
    blamed: list[dict] = field(default_factory=list)          # sensitive instructions that read different state
    paths: str = ""                                           # where the runs' executions part, if they do
    notes: list[str] = field(default_factory=list)            # what the monitor did on purpose that may explain it

    SHOWN = 20

    @property
    def equivalent(self) -> bool:
        return not self.differences

    def to_dict(self) -> dict:
        return {"schema": 1, "guest": self.guest, "monitor": self.monitor, "equivalent": self.equivalent,
                "differences": self.differences, "instructions": self.blamed, "paths": self.paths,
                "notes": self.notes,
                "native": self.native, "monitored": self.other}

    def caption(self) -> str:
        verdict = "equivalent" if self.equivalent else f"diverges in {len(self.differences)} places"
        return f"{self.guest}: native vs {self.monitor}: {verdict}"

    def table(self) -> tuple[list[str], list[list]]:
        """One row per sensitive instruction execution that saw different state than on the bare machine."""
        return (["address", "instruction", "text", "execution", "read", "bare machine"],
                [[b["address"], b["name"], b["text"], b["occurrence"], b["saw"], b["native"]] for b in self.blamed])

    def render_text(self) -> str:
        lines = [f"popek diff {self.guest}: native vs {self.monitor}"]
        if self.equivalent:
            lines.append(f"EQUIVALENT: same console output, exit and visible state "
                         f"({self.native['guest_instructions']} vs {self.other['guest_instructions']} guest instructions)")
        else:
            lines.append(f"DIVERGES in {len(self.differences)} places:")
            lines += [f"  - {d}" for d in self.differences]
        if self.blamed:
            lines.append("\nsensitive-unprivileged instructions that saw different state than on the bare machine:")
            groups: dict[tuple[str, str, str], list[dict]] = {}
            for b in self.blamed:  # the same leak at several sites reads as one line
                groups.setdefault((b["name"], b["saw"], b["native"]), []).append(b)
            for (name, saw, native), sites in list(groups.items())[:self.SHOWN]:
                first = sites[0]
                where = f"{first['address']} ({first['text']})"
                if len(sites) > 1:
                    where += f" and {len(sites) - 1} more execution{'s' * (len(sites) > 2)}"
                lines.append(f"  {name} at {where}: read {saw}; the bare machine gave {native}")
            if len(groups) > self.SHOWN:
                lines.append(f"  ... {len(groups) - self.SHOWN} more (--format json lists every one)")
        elif not self.equivalent:
            lines.append("\nno sensitive-unprivileged instruction of the loaded image read different state")
        if self.paths:
            lines.append(f"\n{self.paths}")
        lines += [f"\nnote: {n}" for n in self.notes]
        return "\n".join(lines)


def _run(guest, monitor: str, classifier: Classifier, budget: int, options: dict):
    from popek.machine.machine import Machine
    from popek.monitors import get_monitor
    from popek.monitors.base import run

    machine = Machine()
    machine.load(guest)
    observer = Observer(classifier)
    observer.attach(machine)
    result = run(machine, get_monitor(monitor, **options), budget)
    return result, observer.records


def diff(guest, monitor: str, *, max_instructions: int = 10_000_000, options: dict | None = None) -> Report:
    """``guest``: a path or a loaded ``popek.machine.Guest``."""
    from popek.machine.guest import Guest, load_guest

    guest = guest if isinstance(guest, Guest) else load_guest(guest)
    classifier = Classifier(language.bundled())
    native, native_obs = _run(guest, "native", classifier, max_instructions, {})
    other, other_obs = _run(guest, monitor, classifier, max_instructions, options or {})
    a, b = native.to_dict(), other.to_dict()
    report = Report(guest.name, monitor, a, b)
    report.differences = _differences(a, b)
    if not report.differences:
        return report
    report.blamed = blame(native_obs, other_obs)
    report.paths = _parting(native_obs, other_obs)
    cpuid = b["events"].get("exit", {}).get("CPUID", 0)
    if cpuid:
        report.notes.append(f"cpuid: {monitor} answered {cpuid} cpuid exit{'s' * (cpuid > 1)} itself and, with the "
                            "control cpuid-hypervisor-bit, reports a hypervisor (CPUID.1:ECX[31], leaves "
                            "0x40000000+): where the difference is in what cpuid returned, that is the "
                            "documented one (docs/hvm.md)")
    if "first hyperprivileged trap: " in other.exit.why:
        trap = other.exit.why.split("first hyperprivileged trap: ", 1)[1]
        report.notes.append(f"{monitor}: the guest is not ported: its first hyperprivileged trap was {trap}; "
                            f"build its source with -D SUN4V (docs/sun4v.md)")
    return report


def blame(native_obs: list[Observation], other_obs: list[Observation]) -> list[dict]:
    """The executions of sensitive-unprivileged instructions that read different state under the monitor than
    the same execution (address, n-th time) did on the bare machine."""
    theirs = {o.key: o for o in native_obs}
    blamed = []
    for o in other_obs:
        ref = theirs.get(o.key)
        if ref is not None and ref.seen != o.seen:
            blamed.append({
                "address": f"{o.address:#x}", "name": o.name, "text": o.text, "occurrence": o.occurrence,
                "saw": ", ".join(f"{s} {v}" for s, v in o.seen),
                "native": ", ".join(f"{s} {v}" for s, v in ref.seen),
            })
    return blamed


CONSOLE_LINES = 12  # differing console lines listed one by one


def _differences(a: dict, b: dict) -> list[str]:
    out = []
    if a["console"] != b["console"]:
        la, lb = a["console"].splitlines(), b["console"].splitlines()
        differing = [i for i in range(max(len(la), len(lb)))
                     if (la[i] if i < len(la) else None) != (lb[i] if i < len(lb) else None)]
        for i in differing[:CONSOLE_LINES]:
            out.append(f"console line {i + 1}: native {la[i] if i < len(la) else '<end>'!r}, "
                       f"monitored {lb[i] if i < len(lb) else '<end>'!r}")
        if len(differing) > CONSOLE_LINES:
            out.append(f"console: {len(differing) - CONSOLE_LINES} more lines differ")
    if a["exit"] != b["exit"]:
        out.append(f"exit: native {a['exit']['reason']} {a['exit']['code']}, "
                   f"monitored {b['exit']['reason']} {b['exit']['code']}")
    for key, value in a["state"].items():
        if b["state"].get(key) != value:
            out.append(f"state {key}: native {_fmt(value)}, monitored {_fmt(b['state'].get(key))}")
    return out


def _fmt(value) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={v:#x}" for k, v in value.items())
    return f"{value:#x}" if isinstance(value, int) else str(value)


def _parting(a: list[Observation], b: list[Observation]) -> str:
    """Where the sequence of observed sensitive instructions first differs (the runs took different paths)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x.key != y.key:
            return (f"the runs part after {i} observed sensitive instructions: native ran {x.name} at "
                    f"{x.address:#x}, monitored ran {y.name} at {y.address:#x}")
    if len(a) != len(b):
        return f"native observed {len(a)} sensitive instructions, monitored {len(b)}"
    return ""


def configure(p) -> None:
    p.add_argument("guest", metavar="GUEST", help="flat image, ELF32 or popek asm source")
    p.add_argument("--monitor", default="trap", help="the monitor to compare with native (default trap)")
    p.add_argument("--ring", type=int, choices=(1, 3), help="trap: the ring the guest kernel runs at")
    p.add_argument("--direct-user", action="store_true", help="bt: run guest user code untranslated")
    p.add_argument("--max-instructions", type=int, default=10_000_000)
    p.add_argument("--format", choices=("text", "json"), default="text")
    from popek.monitors.hvm import command as hvm_command
    hvm_command.configure(p, trace=False)


def run(args) -> int:
    from popek.monitors.hvm import command as hvm_command
    from popek.textout import emit

    options = {"ring": args.ring} if args.ring else {}
    if args.direct_user:
        options["direct_user"] = True
    options.update(hvm_command.options(args))
    from popek import api
    report = api.diff(args.guest, args.monitor, max_instructions=args.max_instructions, **options)
    emit(json.dumps(report.to_dict(), indent=2) if args.format == "json" else report.render_text())
    return 0 if report.equivalent else 1
