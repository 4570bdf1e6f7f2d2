"""`popek diff GUEST --monitor M`: run a guest on the bare machine and under a monitor, report where what the
guest can see differs, and name the sensitive instructions responsible.

How the blame is found: before each run, the guest's loaded image is swept with the classifier, and a code
hook is put on exactly the instructions it observes (nothing else is slowed down). Each time one executes,
the observer records the state that instruction reads, the ISA description's ``reads`` list, as
``_OBSERVE`` says to read each state: for a sensitive-unprivileged instruction (GDTR, IDTR, LDTR, TR, CR0,
EFLAGS.IF/IOPL, CPL, segments) as the real machine holds it at that moment; for state a monitor answers
(CPUID: hvm's cpuid exits) what it was asked and, at the next instruction, the answer the guest got. Pairing the two runs' records by (address, n-th execution) shows, for each instruction, what
the guest saw under the monitor against what the bare machine gave. Under a monitor that runs the guest
directly (``trap``) these hooks see the real, monitor-owned state, which is exactly what such an instruction
leaks; under a translating monitor the guest's instructions do not execute in place and nothing is recorded.
Instructions written at run time (not in the loaded image) are not observed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from unicorn import UC_HOOK_CODE

from popek.decode import decode_at
from popek.isa import language
from popek.isa.classify import Classifier
from popek.loaders import Region
from popek.machine.faults import GuestFault
from popek.machine.memory import RAM_DEFAULT
from popek.machine.result import BUDGET, PORTED_EXITS, UNSUPPORTED
from popek.monitors.base import DEFAULT_BUDGET
from popek.scanner import engine
from popek.tabular import Tabular

EQUIVALENT, DIVERGES, UNDECIDED = "equivalent", "diverges", "undecided"
MEMORY_RANGES = 8   # differing RAM ranges named one by one


@dataclass(frozen=True)
class Verdict:
    """How a run compares with the reference run. ``status`` is EQUIVALENT, DIVERGES or UNDECIDED;
    ``differences`` says what differs, one line each; ``ranges`` are the first differing guest-RAM byte
    ranges ``(start, end)`` (end exclusive); ``reason`` says why the verdict is UNDECIDED."""

    status: str
    differences: tuple[str, ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()
    reason: str = ""

    def to_dict(self) -> dict:
        return {"status": self.status, "differences": list(self.differences),
                "memory_ranges": [[f"{a:#010x}", f"{b:#010x}"] for a, b in self.ranges], "reason": self.reason}


def judge(reference, other, ported: bool = False) -> Verdict:
    """Compare two ``RunResult``s (``reference`` normally native's): console output, exit, the visible
    state and guest RAM (a digest per page; on a difference the first differing byte ranges). ``ported``:
    ``other`` ran another build of the guest (pv's -D PV port), so only its console output and exit can be
    compared with the reference's, not its registers or RAM.

    A run that did not finish (budget, Ctrl-C) proves nothing about how the guest ends: the verdict is then
    UNDECIDED, even when everything seen so far is equal; a difference already visible is still listed. A
    result without a RAM image (built by hand) is UNDECIDED too unless something else already differs."""
    a, b = reference.to_dict(), other.to_dict()
    if ported:
        b["state"] = a["state"]
        reason = b["exit"]["reason"]            # sun4v's mach_exit is the ported build's exit port
        b["exit"] = dict(b["exit"], reason=PORTED_EXITS.get(reason, reason))
    differences = _differences(a, b)
    ranges: tuple[tuple[int, int], ...] = ()
    if not ported and reference.memory is not None and other.memory is not None:
        ranges, text = memory_differences(reference.memory, other.memory)
        differences += text
    unfinished = [f"{which} ended on {r.exit.reason} ({r.exit.why or r.guest_instructions})"
                  f"{_ADVICE.get(r.exit.reason, '')}"
                  for which, r in (("reference", reference), ("monitored", other)) if not r.finished]
    if unfinished:
        return Verdict(UNDECIDED, tuple(differences), ranges, "; ".join(unfinished))
    if differences:
        return Verdict(DIVERGES, tuple(differences), ranges)
    if not ported and (reference.memory is None or other.memory is None):
        return Verdict(UNDECIDED, (), (), "no guest RAM image to compare")
    return Verdict(EQUIVALENT)


# What to do about a run that did not end, by its end reason.
_ADVICE = {BUDGET: " (raise --max-instructions)", UNSUPPORTED: " (the monitor cannot run this guest further)"}


def memory_differences(a, b) -> tuple[tuple[tuple[int, int], ...], list[str]]:
    """The first differing byte ranges of two ``RamImage``s and a line per range (nothing when equal)."""
    if a.size != b.size:
        return (), [f"guest RAM size: reference {a.size:#x}, monitored {b.size:#x}"]
    if a.digest == b.digest:
        return (), []
    pages = sorted(p for p in set(a.pages) | set(b.pages) if a.pages.get(p) != b.pages.get(p))
    ranges: list[tuple[int, int]] = []
    for page in pages:
        x, y = a.page(page), b.page(page)
        if x is None or y is None:                      # a result read back from JSON: the page is all we know
            spans = [(0, len(x or y or b"\0" * 0x1000))]
        else:
            spans = _byte_spans(x, y)
        for start, end in spans:
            start, end = page + start, page + end
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        if len(ranges) > MEMORY_RANGES:
            break
    shown = ranges[:MEMORY_RANGES]
    text = [f"guest RAM differs on {len(pages)} page{'s' * (len(pages) > 1)}"
            + (f", first at {shown[0][0]:#010x}" if shown else "")]
    text += [f"guest RAM {s:#010x}..{e - 1:#010x} ({e - s} bytes)" for s, e in shown]
    return tuple(shown), text


def _byte_spans(x: bytes, y: bytes) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, (p, q) in enumerate(zip(x, y)):
        if p != q and start is None:
            start = i
        elif p == q and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(x)))
    return spans

def _field(state: str, read: Callable) -> Callable:
    return lambda m: ((state, read(m)),)


@dataclass(frozen=True)
class Probe:
    """How to observe one piece of state (a ``reads`` name of the ISA description) at an instruction.

    ``before``: (field, value) pairs read on the machine as the instruction starts. That is what a
    sensitive-unprivileged instruction reads, because it runs in place under every monitor, so such probes
    are used at sensitive-unprivileged sites only (elsewhere a trapping monitor emulates the instruction and
    the real state is not what the guest got). ``after``: for state a monitor may answer for the guest
    (cpuid's), the answer as the guest got it, read once the instruction has completed; ``before`` then says
    what was asked. Such a probe is valid at any site: whoever carried the instruction out, its result is
    what the guest sees."""

    before: Callable
    after: Callable | None = None
    why: str = ""                   # for an answered state: why a monitor's answer may differ (a note)


_REGS = ("eax", "ebx", "ecx", "edx")
# How to read, on the machine, each piece of state the description says an instruction reads.
_OBSERVE = {
    "GDTR": Probe(_field("GDTR", lambda m: "base={1:#010x} limit={2:#06x}".format(*m.table("gdtr")))),
    "IDTR": Probe(_field("IDTR", lambda m: "base={1:#010x} limit={2:#06x}".format(*m.table("idtr")))),
    "LDTR": Probe(_field("LDTR", lambda m: f"{m.table('ldtr')[0] & 0xFFFF:#06x}")),
    "TR": Probe(_field("TR", lambda m: f"{m.table('tr')[0] & 0xFFFF:#06x}")),
    "CR0": Probe(_field("CR0", lambda m: f"{m.reg('cr0'):#010x}")),
    "EFLAGS.IF": Probe(_field("EFLAGS.IF", lambda m: str((m.reg("eflags") >> 9) & 1))),
    "EFLAGS.IOPL": Probe(_field("EFLAGS.IOPL", lambda m: str((m.reg("eflags") >> 12) & 3))),
    "CPL": Probe(_field("CPL", lambda m: str(m.reg("cs") & 3))),
    "segments": Probe(_field("segments", lambda m: "cs={cs:#06x} ss={ss:#06x}".format(**m.registers(("cs", "ss"))))),
    # cpuid: asked with EAX (leaf) and ECX (subleaf), answered in EAX, EBX, ECX, EDX (SDM Vol. 2A, CPUID)
    "CPUID": Probe(lambda m: (("leaf", f"{m.reg('eax'):#x}"), ("subleaf", f"{m.reg('ecx'):#x}")),
                   lambda m: tuple((r, f"{v:#010x}") for r, v in m.registers(_REGS).items()),
                   "hvm answers cpuid itself at a CPUID exit and, with the control cpuid-hypervisor-bit, "
                   "reports a hypervisor (CPUID.1:ECX[31], the leaves 0x40000000+): the documented "
                   "difference (docs/hvm.md)"),
}


@dataclass(frozen=True)
class Observation:
    address: int
    name: str
    text: str
    occurrence: int                 # 1 for the first execution of this address, 2 for the second, ...
    seen: tuple[tuple[str, str], ...]   # (field, value as the instruction read it or answered it)
    asked: tuple[tuple[str, str], ...] = ()     # (field, value) of what an answered instruction was asked
    why: str = ""                                # the answered state's note (``Probe.why``)

    @property
    def key(self) -> tuple[int, int]:
        return self.address, self.occurrence


@dataclass(frozen=True)
class _Site:
    name: str
    text: str
    next: int                       # the address after the instruction, where an answer is read
    before: tuple[Probe, ...]       # state read as it starts
    answers: tuple[Probe, ...]      # state it answers, read as the next instruction starts


class Observer:
    """Records what the observed instructions of a loaded guest read, each time they run: the
    sensitive-unprivileged ones (the state they read in place) and those whose state a monitor answers
    (cpuid: what was asked and the answer), as ``_OBSERVE`` says for each state the ISA description names."""

    LIMIT = 10_000  # records kept per run: enough to find the first differences, bounded for looping guests

    def __init__(self, classifier: Classifier):
        self.classifier = classifier
        self.records: list[Observation] = []
        self._counts: dict[int, int] = {}
        self._sites: dict[int, _Site] = {}
        self._pending: dict[int, tuple[int, _Site, int, tuple]] = {}   # next address -> (site, n, asked)

    def attach(self, machine) -> None:
        hooked: set[int] = set()
        for address, data in machine.guest.segments:
            region = Region("guest", address, data, 32)
            findings, _ = engine.linear(region, self.classifier)
            for f in findings:
                in_place = f.cls == "sensitive-unprivileged"
                probes = [_OBSERVE[s] for s in self.classifier.isa.instructions[f.name].reads if s in _OBSERVE]
                answers = tuple(p for p in probes if p.after is not None)
                if not in_place and not answers:
                    continue
                before = tuple(p for p in probes if p.after is None) if in_place else ()
                self._sites[f.address] = _Site(f.name, f.text, f.address + f.size, before, answers)
                hooked.add(f.address)
                if answers:
                    hooked.add(f.address + f.size)
        for address in sorted(hooked):
            machine.uc.hook_add(UC_HOOK_CODE, self._hook, machine, address, address)

    def _hook(self, uc, address: int, size: int, machine) -> None:
        pending = self._pending.pop(address, None)
        if pending is not None:             # the answered instruction before this one has completed
            site_address, site, n, asked = pending
            seen = tuple(pair for p in site.answers for pair in p.after(machine))
            why = "; ".join(p.why for p in site.answers if p.why)
            self._keep(Observation(site_address, site.name, site.text, n, seen, asked, why))
        site = self._sites.get(address)
        if site is None or len(self.records) >= self.LIMIT:
            return
        n = self._counts[address] = self._counts.get(address, 0) + 1
        if site.answers:
            asked = tuple(pair for p in site.answers for pair in p.before(machine))
            self._pending[site.next] = (address, site, n, asked)
        else:
            self._keep(Observation(address, site.name, site.text, n,
                                   tuple(pair for p in site.before for pair in p.before(machine))))

    def _keep(self, o: Observation) -> None:
        if len(self.records) < self.LIMIT:
            self.records.append(o)


class Writers:
    """The last instruction (EIP) that stored into each of some byte ranges of guest RAM (physical
    addresses; paging on, a write's physical address is looked up through the machine)."""

    def __init__(self, ranges):
        self.ranges = tuple(ranges)
        self.last: dict[tuple[int, int], int] = {}

    def attach(self, machine) -> None:
        from unicorn import UC_HOOK_MEM_WRITE
        machine.uc.hook_add(UC_HOOK_MEM_WRITE, self._hook, machine)

    def _hook(self, uc, access, address, size, value, machine) -> None:
        try:
            physical = machine.address_space().physical(address, size, write=True)
        except GuestFault:                              # a write that faults stores nothing
            return
        for r in self.ranges:
            if physical < r[1] and physical + size > r[0]:
                self.last[r] = machine.reg("eip")


@dataclass
class Report(Tabular):
    guest: str
    monitor: str
    native: dict
    other: dict
    differences: list[str] = field(default_factory=list)      # what the guest can see that differs
    blamed: list[dict] = field(default_factory=list)          # observed instructions that saw different state
    paths: str = ""                                           # where the runs' executions part, if they do
    verdict: Verdict = Verdict(EQUIVALENT)
    writers: list[dict] = field(default_factory=list)         # differing RAM ranges and who wrote them
    notes: list[str] = field(default_factory=list)            # what the monitor did on purpose that may explain it

    SHOWN = 20

    @property
    def equivalent(self) -> bool:
        return self.verdict.status == EQUIVALENT

    @property
    def status(self) -> str:
        return self.verdict.status

    def to_dict(self) -> dict:
        return {"schema": 2, "guest": self.guest, "monitor": self.monitor, "status": self.status,
                "equivalent": self.equivalent, "undecided_reason": self.verdict.reason,
                "differences": self.differences, "memory_writers": self.writers, "instructions": self.blamed,
                "paths": self.paths, "notes": self.notes, "native": self.native, "monitored": self.other}

    def caption(self) -> str:
        verdict = "equivalent" if self.equivalent else f"diverges in {len(self.differences)} places"
        return f"{self.guest}: native vs {self.monitor}: {verdict}"

    def table(self) -> tuple[list[str], list[list]]:
        """One row per observed instruction execution that saw different state than on the bare machine."""
        return (["address", "instruction", "text", "execution", "asked", "read", "bare machine"],
                [[b["address"], b["name"], b["text"], b["occurrence"], _pairs(b["asked"]), b["saw"], b["native"]]
                 for b in self.blamed])

    def render_text(self) -> str:
        lines = [f"popek diff {self.guest}: native vs {self.monitor}"]
        if self.equivalent:
            counts = self.native['guest_instructions'], self.other['guest_instructions']
            lines.append(f"EQUIVALENT: same console output, exit, visible state and guest RAM "
                         f"({counts[0]} vs {counts[1]} guest instructions)")
            if counts[0] != counts[1]:          # (equivalence allows timing; the machine's clock is the count)
                lines.append("  the instruction counts differ: the same result at another time (a timer "
                             "interrupt would have landed elsewhere)")
        elif self.status == UNDECIDED:
            lines.append(f"UNDECIDED: {self.verdict.reason}; a run that did not end proves nothing")
            lines += [f"  - already differs: {d}" for d in self.differences]
        else:
            lines.append(f"DIVERGES in {len(self.differences)} places:")
            lines += [f"  - {d}" for d in self.differences]
        if self.writers:
            lines.append("\nlast stores into the differing guest RAM:")
            lines += [f"  {w['range']}: native {w['native'] or 'no store seen'}, monitored "
                      f"{w['monitored'] or 'no store seen'}" for w in self.writers]
        if self.blamed:
            lines.append("\ninstructions that saw different state than on the bare machine:")
            groups: dict[tuple[str, str, str, str], list[dict]] = {}
            for b in self.blamed:  # the same leak at several sites reads as one line
                groups.setdefault((b["name"], _pairs(b["asked"]), b["saw"], b["native"]), []).append(b)
            for (name, asked, saw, native), sites in list(groups.items())[:self.SHOWN]:
                first = sites[0]
                where = f"{first['address']} ({first['text']})"
                if len(sites) > 1:
                    where += f" and {len(sites) - 1} more execution{'s' * (len(sites) > 2)}"
                if asked:           # an answered instruction: what it was asked, which outputs differ
                    lines.append(f"  {name} at {where}, {asked}: {', '.join(first['fields'])} differ: "
                                 f"{self.monitor} answered {saw}; the bare machine answered {native}")
                else:
                    lines.append(f"  {name} at {where}: read {saw}; the bare machine gave {native}")
            if len(groups) > self.SHOWN:
                lines.append(f"  ... {len(groups) - self.SHOWN} more (--format json lists every one)")
        elif self.status == DIVERGES:
            lines.append("\nno observed instruction of the loaded image (the sensitive-unprivileged ones, and cpuid's "
                         "answers) saw different state")
        if self.paths:
            lines.append(f"\n{self.paths}")
        lines += [f"\nnote: {n}" for n in self.notes]
        return "\n".join(lines)


def _run(guest, monitor: str, classifier: Classifier, budget: int, options: dict, machine_options: dict,
         writers=None):
    from popek.machine import interruptible
    from popek.machine.machine import Machine
    from popek.monitors import get_monitor
    from popek.monitors.base import run

    if interruptible.pending():
        raise KeyboardInterrupt
    machine = Machine(**machine_options)
    machine.load(guest)
    observer = Observer(classifier)
    observer.attach(machine)
    if writers is not None:
        writers.attach(machine)
    result = run(machine, get_monitor(monitor, **options), budget)
    return result, observer.records


def diff(guest, monitor: str, *, max_instructions: int = DEFAULT_BUDGET, options: dict | None = None,
         ram_size: int = RAM_DEFAULT, umip: bool = False) -> Report:
    """``guest``: a path or a loaded ``popek.machine.Guest``."""
    from popek.machine.guest import Guest, load_guest

    guest = guest if isinstance(guest, Guest) else load_guest(guest, ram_size=ram_size)
    machine = {"ram_size": ram_size, "umip": umip}
    classifier = Classifier(language.bundled())
    native, native_obs = _run(guest, "native", classifier, max_instructions, {}, machine)
    other, other_obs = _run(guest, monitor, classifier, max_instructions, options or {}, machine)
    verdict = judge(native, other)
    report = Report(guest.name, monitor, native.to_dict(), other.to_dict(), verdict=verdict)
    report.differences = list(verdict.differences)
    if not report.differences:
        return report
    if verdict.ranges:      # run both again (runs are deterministic) watching who stores into those bytes
        seen = []
        for which, opts in (("native", {}), (monitor, options or {})):
            w = Writers(verdict.ranges)
            _run(guest, which, classifier, max_instructions, opts, machine, w)
            seen.append(w.last)
        for r in verdict.ranges:
            report.writers.append({"range": f"{r[0]:#010x}..{r[1] - 1:#010x}",
                                   "native": _writer(guest, seen[0].get(r)),
                                   "monitored": _writer(guest, seen[1].get(r))})
    report.blamed = blame(native_obs, other_obs)
    report.paths = _parting(native_obs, other_obs)
    report.notes += [f"{b['name']} at {b['address']}: {b['why']}" for b in
                     {b["why"]: b for b in reversed(report.blamed) if b["why"]}.values()][::-1]
    if "first hyperprivileged trap: " in other.exit.why:
        trap = other.exit.why.split("first hyperprivileged trap: ", 1)[1]
        report.notes.append(f"{monitor}: the guest is not ported: its first hyperprivileged trap was {trap}; "
                            f"build its source with -D SUN4V (docs/sun4v.md)")
    return report


def blame(native_obs: list[Observation], other_obs: list[Observation]) -> list[dict]:
    """The executions of observed instructions that read (or were answered) different state under the monitor
    than the same execution (address, n-th time) on the bare machine: each names what it was asked (cpuid's
    leaf and subleaf), the fields that differ (``fields``: field -> native and monitored values) and, as
    text, the differing fields under both (``saw``, ``native``)."""
    theirs = {o.key: o for o in native_obs}
    blamed = []
    for o in other_obs:
        ref = theirs.get(o.key)
        if ref is None or (ref.seen, ref.asked) == (o.seen, o.asked):
            continue
        mine, native = dict(o.seen), dict(ref.seen)
        differ = [k for k in dict.fromkeys([*native, *mine]) if native.get(k) != mine.get(k)] or list(mine)
        blamed.append({
            "address": f"{o.address:#x}", "name": o.name, "text": o.text, "occurrence": o.occurrence,
            "asked": {k: v for k, v in o.asked}, "native_asked": {k: v for k, v in ref.asked},
            "fields": {k: {"native": native.get(k), "monitored": mine.get(k)} for k in differ},
            "why": o.why,
            "saw": ", ".join(f"{k} {mine.get(k)}" for k in differ),
            "native": ", ".join(f"{k} {native.get(k)}" for k in differ),
        })
    return blamed


def _pairs(asked: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in asked.items())


def _writer(guest, eip: int | None) -> str | None:
    """``eip`` and, when it is in the loaded image, the instruction there (a translating monitor stores
    from its cache: such an address is the monitor's, named as it is)."""
    if eip is None:
        return None
    for address, data in guest.segments:
        if address <= eip < address + len(data):
            insn = decode_at(data, eip - address, address, 32)
            if insn is not None:
                return f"{eip:#x} ({insn.text})"
    return f"{eip:#x}"


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
    from popek import arguments
    from popek.machine.command import add_run_options

    p.add_argument("guest", metavar="GUEST", help="flat image, ELF32 or popek asm source")
    p.add_argument("--monitor", type=arguments.monitor_name, default="trap",
                   help="the monitor to compare with native (default trap)")
    add_run_options(p, trace_exits=False)
    p.add_argument("--format", choices=("text", "json"), default="text")


def run(args) -> int:
    from popek.cli import EXIT_FOUND, EXIT_OK, EXIT_UNDECIDED
    from popek.machine.command import check_monitor, monitor_options
    from popek.machine.memory import MIB
    from popek.textout import emit

    options = monitor_options(args)
    check_monitor(args.monitor, options)
    from popek import api
    report = api.diff(args.guest, args.monitor, max_instructions=args.max_instructions,
                      ram_size=args.ram * MIB, umip=args.umip, **options)
    emit(json.dumps(report.to_dict(), indent=2) if args.format == "json" else report.render_text())
    return {EQUIVALENT: EXIT_OK, DIVERGES: EXIT_FOUND, UNDECIDED: EXIT_UNDECIDED}[report.status]
