"""The result of one run and the event counts that go into it (docs/run-document.md describes every key).

``RunResult.to_dict()`` is the JSON document of ``popek run --format json``; ``from_dict`` reads one back
(unknown or missing keys are an error), and ``render_text`` is what the text format prints. Register values
in ``state`` are integers; the text rendering shows them in hex. ``guest_instructions`` counts executed
instructions (see popek.machine.machine); ``wall_seconds`` is the run loop alone, without creating the
machine or loading the guest. ``modelled_cycles`` and ``profile`` are filled by the cost model
(popek.cost.apply; null when no profile was applied). ``memory`` is guest RAM at the end of the run (``RamImage``): a digest per page that is not all zero, so
that two runs can be judged on RAM too (popek.experiments.divergence.judge).

Schema 2 (schema 1 had no ``memory`` and no end reason ``interrupted``).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

from popek.events import kind as documented_kind
from popek.tabular import Tabular

SCHEMA = 2

# End reasons. Each run ends with exactly one.
# ``shutdown`` and ``crash`` end a paravirtual domain (pv: sched_op shutdown with its reason as the code; the
# hypervisor crashing the domain, e.g. an exception with no trap-table entry). ``mach-exit`` ends a sun4v
# domain that called the hypervisor's mach_exit (its code is %o0 & 0xFF).
# ``unsupported`` ends a run where the monitor met what it does not model (machine.faults.NotModelled).
EXIT_PORT, HLT, TRIPLE_FAULT, BUDGET, INTERRUPTED = "exit-port", "hlt", "triple-fault", "budget", "interrupted"
SHUTDOWN, CRASH, MACH_EXIT, UNSUPPORTED = "shutdown", "crash", "mach-exit", "unsupported"
REASONS = (EXIT_PORT, HLT, TRIPLE_FAULT, BUDGET, INTERRUPTED, SHUTDOWN, CRASH, MACH_EXIT, UNSUPPORTED)
# How a ported build ends where the native build writes the exit port (compare judges them as one end).
PORTED_EXITS = {MACH_EXIT: EXIT_PORT}
# Reasons after which the run could have gone on: the guest did not end it, so nothing about its end is known.
UNFINISHED = frozenset({BUDGET, INTERRUPTED, UNSUPPORTED})

PAGE_SIZE = 0x1000


def page_digest(page: bytes) -> str:
    return hashlib.blake2b(page, digest_size=16).hexdigest()


@dataclass(frozen=True)
class RamImage:
    """Guest RAM at the end of a run: ``pages`` maps the physical address of every page that is not all
    zero to its digest (``page_digest``); a page not listed is all zero. ``contents`` holds those pages'
    bytes when the image was taken in this process (not serialised), so that a comparison can name byte
    ranges rather than pages."""

    size: int
    pages: dict[int, str]
    contents: dict[int, bytes] | None = field(default=None, compare=False, repr=False)

    @property
    def digest(self) -> str:
        """One digest of the whole RAM (its size and every page's digest)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.size.to_bytes(8, "little"))
        for address in sorted(self.pages):
            h.update(address.to_bytes(8, "little") + bytes.fromhex(self.pages[address]))
        return h.hexdigest()

    def page(self, address: int) -> bytes | None:
        """The bytes of the page at ``address`` (zeros if it is not listed), or None when not kept."""
        if address not in self.pages:
            return bytes(PAGE_SIZE)
        return None if self.contents is None else self.contents.get(address)

    def to_dict(self) -> dict:
        return {"page_size": PAGE_SIZE, "size": self.size, "digest": self.digest,
                "pages": {f"{a:#010x}": d for a, d in sorted(self.pages.items())}}

    @classmethod
    def from_dict(cls, doc: dict) -> RamImage:
        if set(doc) != {"page_size", "size", "digest", "pages"} or doc["page_size"] != PAGE_SIZE:
            raise ValueError(f"memory: unexpected keys or page size: {sorted(doc)}")
        image = cls(doc["size"], {int(a, 16): d for a, d in doc["pages"].items()})
        if image.digest != doc["digest"]:
            raise ValueError("memory: the digest does not match the pages")
        return image

# The guest-visible state, in document order.
GENERAL = ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp", "eip", "eflags")
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")
STATE_KEYS = GENERAL + SEGMENTS + ("cpl", "gdtr", "idtr", "ldtr", "tr", "cr0", "cr2", "cr3", "cr4")
TABLES = ("gdtr", "idtr")


class Events:
    """Counts by kind and name. Lives on the run, so that two runs never share counts.

    The machine counts what the guest's IDT received (``exception``: ``#GP``...; ``software-interrupt``:
    ``int 0x80``...; ``external-interrupt``: ``vector 0x20``...), faults raised while delivering one
    (``delivery-fault``), port accesses by device (``io``: ``com1``, ``pic``, ``pit``, ``exit``,
    ``unclaimed``), timer edges (``timer``: ``irq0``), clocks skipped while halted (``idle``: ``clocks``)
    and UMIP rescans (``umip``). A monitor adds its own kinds (``trap``, ``exit``, ``hypercall``,
    ``callout``, ``translation``, ``invalidation``), named by the canonical instruction names of DESIGN
    §3.1 where an instruction is the cause. An event a monitor handles never reaches the guest's IDT and
    is not counted by the machine. Every kind is one of popek.events.KINDS (that module documents the kinds
    and names); counting an undocumented kind raises KeyError.
    """

    def __init__(self):
        self._kinds: dict[str, Counter] = {}

    def count(self, kind: str, name: str, n: int = 1) -> None:
        counter = self._kinds.get(kind)
        if counter is None:
            counter = self.counter(kind)
        counter[name] += n

    def counter(self, kind: str) -> Counter:
        """The live counts of one kind, for a hook that counts on every event (``counter[name] += 1``)."""
        counter = self._kinds.get(kind)
        if counter is None:
            documented_kind(kind)
            counter = self._kinds[kind] = Counter()
        return counter

    def get(self, kind: str, name: str) -> int:
        return self._kinds.get(kind, Counter())[name]

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {kind: dict(sorted(c.items())) for kind, c in sorted(self._kinds.items()) if c}


@dataclass(frozen=True)
class Exit:
    reason: str
    code: int | None = None
    why: str = ""           # one line for people (the text format); not part of the JSON contract

    def __post_init__(self):
        assert self.reason in REASONS, self.reason


@dataclass
class RunResult(Tabular):
    monitor: str
    guest: str
    exit: Exit
    console: str
    state: dict
    events: dict
    guest_instructions: int
    wall_seconds: float
    memory: RamImage | None = None              # None only for a result built by hand (judge: undecided)
    modelled_cycles: int | None = None
    profile: dict | None = None            # {"name", "breakdown": {kind: cycles}, "unpriced": [...]}
    extra: dict = field(default_factory=dict)   # not serialised: details for the text format

    @property
    def finished(self) -> bool:
        """The guest ended the run itself (exit port, hlt or a triple fault), not the budget, Ctrl-C or a
        monitor that does not model what the guest did."""
        return self.exit.reason not in UNFINISHED

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "monitor": self.monitor,
            "guest": self.guest,
            "exit": {"reason": self.exit.reason, "code": self.exit.code},
            "console": self.console,
            "state": self.state,
            "events": self.events,
            "guest_instructions": self.guest_instructions,
            "memory": self.memory.to_dict() if self.memory is not None else None,
            "modelled_cycles": self.modelled_cycles,
            "profile": self.profile,
            "wall_seconds": self.wall_seconds,
        }

    @classmethod
    def from_dict(cls, doc: dict) -> RunResult:
        expected = {"schema", "monitor", "guest", "exit", "console", "state", "events", "guest_instructions",
                    "memory", "modelled_cycles", "profile", "wall_seconds"}
        if set(doc) != expected:
            raise ValueError(f"run result keys differ: {sorted(set(doc) ^ expected)}")
        if doc["schema"] != SCHEMA:
            raise ValueError(f"run result schema {doc['schema']!r}, expected {SCHEMA}")
        if set(doc["state"]) != set(STATE_KEYS):
            raise ValueError(f"state keys differ: {sorted(set(doc['state']) ^ set(STATE_KEYS))}")
        return cls(monitor=doc["monitor"], guest=doc["guest"],
                   exit=Exit(doc["exit"]["reason"], doc["exit"]["code"]), console=doc["console"],
                   state=doc["state"], events=doc["events"], guest_instructions=doc["guest_instructions"],
                   wall_seconds=doc["wall_seconds"],
                   memory=RamImage.from_dict(doc["memory"]) if doc["memory"] is not None else None,
                   modelled_cycles=doc["modelled_cycles"],
                   profile=doc["profile"])

    def caption(self) -> str:
        code = f" {self.exit.code}" if self.exit.code is not None else ""
        return (f"{self.guest} under {self.monitor}: {self.exit.reason}{code} after "
                f"{self.guest_instructions:,} guest instructions")

    def table(self) -> tuple[list[str], list[list]]:
        """One row per counted event."""
        return (["kind", "name", "count"],
                [[kind, name, n] for kind, names in self.events.items() for name, n in names.items()])

    def render_text(self) -> str:
        s = self.state
        lines = []
        if self.console:
            lines.append(self.console if self.console.endswith("\n") else self.console + "\n")
        code = f" {self.exit.code}" if self.exit.code is not None else ""
        why = f" ({self.exit.why})" if self.exit.why else ""
        lines.append(f"exit: {self.exit.reason}{code}{why} after {self.guest_instructions} guest instructions, "
                     f"{self.wall_seconds:.3f} s, monitor {self.monitor}\n")
        lines.append("  " + " ".join(f"{k}={s[k]:08x}" for k in GENERAL[:6]) + "\n")
        lines.append("  " + " ".join(f"{k}={s[k]:08x}" for k in GENERAL[6:]) + f" cpl={s['cpl']}\n")
        lines.append("  " + " ".join(f"{k}={s[k]:04x}" for k in SEGMENTS)
                     + f" ldtr={s['ldtr']:04x} tr={s['tr']:04x}\n")
        lines.append("  " + " ".join(f"{k}={s[k]['base']:08x}/{s[k]['limit']:04x}" for k in TABLES)
                     + " " + " ".join(f"{k}={s[k]:08x}" for k in ("cr0", "cr2", "cr3", "cr4")) + "\n")
        for kind, names in self.events.items():
            lines.append(f"  {kind}: " + ", ".join(f"{n} {c}" for n, c in names.items()) + "\n")
        if "cost" in self.extra:
            lines.append(self.extra["cost"].summary() + "\n")
        if "note" in self.extra:
            lines.append(f"note: {self.extra['note']}\n")
        return "".join(lines)
