"""``popek domains CONFIG.toml``: several sun4v logical domains on one modelled chip, with channels.

A configuration (docs/sun4v.md) names the chip (T1: 32 strands, T2: 64), the domains (a guest, 1 vCPU,
memory as ``ldm set-memory`` takes it) and the channels between them. Each domain gets a dedicated strand
and its own machine: its memory is that machine's RAM, real addresses 0 .. its size, so no domain can
reach another's memory (an access beyond it is the bare machine's #GP(0), a hypervisor buffer beyond it
ENORADDR), and its channel numbers are only those its configuration gives it (any other is ECHANNEL).

The domains run interleaved deterministically in fixed instruction slices: every running domain in turn
runs ``slice`` guest instructions (``popek.monitors.base.Run.step``, the one run loop), conceptually in
parallel on their strands. A domain waiting in cpu_yield for a channel entry gives up its turn until an
entry arrives or a channel's state changes; when every running domain waits so, none can ever be woken
and each ends (reason ``hlt``, saying so). One domain's end (mach_exit, a triple fault, its budget) stops
only that domain: the others run on to their own ends.

Errors in a configuration are one line naming the file and line (``CONFIG:LINE: ...``), as ``ldm`` refuses
a request it cannot satisfy: an unknown key, a duplicate name, an endpoint naming an unknown domain, more
strands or memory than the chip has, a guest that is missing or does not fit its memory.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from popek.errors import BadInput, PopekError, UsageError
from popek.machine.memory import MIB, PAGE, RAM_MAX
from popek.machine.result import HLT, RunResult
from popek.monitors.sun4v.api import parse_size
from popek.monitors.sun4v.channels import Channel

SCHEMA = 1
DEFAULT_MEMORY = 32 * MIB
DEFAULT_SLICE = 1000


@dataclass(frozen=True)
class Chip:
    name: str
    strands: int
    memory: int
    what: str


# Strands: UltraSPARC T1, 8 cores x 4 strands; T2, 8 cores x 8 strands. Memory: what popek lets a chip's
# domains share in total (assumed: a Sun Fire T2000's 32 GB and a SPARC Enterprise T5220's 64 GB).
CHIPS = {
    "T1": Chip("T1", 32, 32 << 30, "UltraSPARC T1: 8 cores x 4 strands; 32 GiB of memory (assumed)"),
    "T2": Chip("T2", 64, 64 << 30, "UltraSPARC T2: 8 cores x 8 strands; 64 GiB of memory (assumed)"),
}
TOP_KEYS, DOMAIN_KEYS, CHANNEL_KEYS, ENDPOINT_KEYS = {"chip", "domain", "channel"}, \
    {"name", "guest", "vcpus", "memory"}, {"name", "endpoints"}, {"domain", "id"}


@dataclass(frozen=True)
class DomainSpec:
    name: str
    guest: str          # the guest's path (relative paths resolved against the configuration's directory)
    memory: int
    strand: int
    line: int = 0       # the line of its guest key, for errors found when the guest is loaded


@dataclass(frozen=True)
class ChannelSpec:
    name: str
    endpoints: tuple[tuple[str, int], tuple[str, int]]


@dataclass(frozen=True)
class Config:
    path: str
    chip: Chip
    domains: tuple[DomainSpec, ...]
    channels: tuple[ChannelSpec, ...]


class _Lines:
    """Where a key of the n-th ``[[table]]`` is in the file, for error messages (tomllib keeps no
    positions)."""

    HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?")

    def __init__(self, path: str, text: str):
        self.path, self.lines = path, text.splitlines()

    def of(self, table: str | None, index: int = 0, key: str | None = None) -> int:
        """The line of ``key`` in the ``index``-th ``[[table]]`` (its header without ``key``; None: top
        level)."""
        seen, inside, header = -1, table is None, 1
        for number, line in enumerate(self.lines, 1):
            m = self.HEADER.match(line)
            if m:
                if inside and seen >= 0 or inside and table is None:
                    break
                if m.group(1) == table:
                    seen += 1
                    inside, header = seen == index, number
                continue
            if inside and key is not None and re.match(rf"^\s*{re.escape(key)}\s*=", line):
                return number
        return header

    def error(self, message: str, table: str | None = None, index: int = 0, key: str | None = None) -> BadInput:
        return BadInput(f"{self.path}:{self.of(table, index, key)}: {message}")


def load_config(path: str) -> Config:
    """Read and check a domain configuration; BadInput with ``FILE:LINE: message`` on anything ldm would
    refuse."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not a text file") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"line (\d+)", str(exc))
        raise BadInput(f"{path}:{where.group(1) if where else 1}: not TOML: {exc}") from None
    at = _Lines(path, text)
    unknown = sorted(set(doc) - TOP_KEYS)
    if unknown:
        raise at.error(f"unknown key {unknown[0]!r} (known: chip, [[domain]], [[channel]])", None, 0, unknown[0])
    chip_name = doc.get("chip", "T1")
    if chip_name not in CHIPS:
        raise at.error(f"chip {chip_name!r} is not modelled (T1 or T2)", None, 0, "chip")
    chip = CHIPS[chip_name]
    domains_doc, channels_doc = doc.get("domain", []), doc.get("channel", [])
    if not isinstance(domains_doc, list) or not domains_doc:
        raise at.error("no [[domain]]: a configuration needs at least one domain", None, 0, "domain")
    if not isinstance(channels_doc, list):
        raise at.error("channel must be an array of tables ([[channel]])", None, 0, "channel")
    base = Path(path).resolve().parent
    domains: list[DomainSpec] = []
    strands = memory = 0
    for i, d in enumerate(domains_doc):
        if not isinstance(d, dict):
            raise at.error("a domain must be a table ([[domain]])", "domain", i)
        unknown = sorted(set(d) - DOMAIN_KEYS)
        if unknown:
            raise at.error(f"unknown key {unknown[0]!r} in a domain (known: {', '.join(sorted(DOMAIN_KEYS))})",
                           "domain", i, unknown[0])
        for key in ("name", "guest"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise at.error(f"a domain needs a {key} (a string)", "domain", i, key)
        name = d["name"]
        if any(o.name == name for o in domains):
            raise at.error(f"duplicate domain name {name!r}", "domain", i, "name")
        vcpus = d.get("vcpus", 1)
        if not isinstance(vcpus, int) or isinstance(vcpus, bool) or vcpus < 1:
            raise at.error(f"domain {name!r}: vcpus must be a positive integer", "domain", i, "vcpus")
        if vcpus > 1:
            raise at.error(f"domain {name!r}: vcpus = {vcpus}: SMP domains are not modelled (1 vCPU per domain)",
                           "domain", i, "vcpus")
        strands += vcpus
        if strands > chip.strands:
            raise at.error(f"domain {name!r}: no strand left: the {chip.name} has {chip.strands} strands "
                           f"(ldm add-vcpu would refuse)", "domain", i, "name")
        size = _memory(at, d.get("memory", DEFAULT_MEMORY), name, i)
        memory += size
        if memory > chip.memory:
            raise at.error(f"domain {name!r}: not enough memory left: the domains ask for {memory >> 20} MiB, "
                           f"the {chip.name} has {chip.memory >> 20} MiB (assumed)", "domain", i, "memory")
        guest = Path(d["guest"]) if Path(d["guest"]).is_absolute() else base / d["guest"]
        if not guest.is_file():
            raise at.error(f"domain {name!r}: guest {d['guest']!r} not found", "domain", i, "guest")
        domains.append(DomainSpec(name, str(guest), size, strands - 1, at.of("domain", i, "guest")))
    channels: list[ChannelSpec] = []
    used: set[tuple[str, int]] = set()
    known = {d.name for d in domains}
    for i, c in enumerate(channels_doc):
        if not isinstance(c, dict):
            raise at.error("a channel must be a table ([[channel]])", "channel", i)
        unknown = sorted(set(c) - CHANNEL_KEYS)
        if unknown:
            raise at.error(f"unknown key {unknown[0]!r} in a channel (known: endpoints, name)", "channel", i,
                           unknown[0])
        name = c.get("name")
        if not isinstance(name, str) or not name:
            raise at.error("a channel needs a name (a string)", "channel", i, "name")
        if any(o.name == name for o in channels):
            raise at.error(f"duplicate channel name {name!r}", "channel", i, "name")
        ends = c.get("endpoints")
        if not isinstance(ends, list) or len(ends) != 2:
            raise at.error(f"channel {name!r}: endpoints must list two endpoints", "channel", i, "endpoints")
        pair = []
        for e in ends:
            if not isinstance(e, dict) or set(e) != ENDPOINT_KEYS:
                raise at.error(f"channel {name!r}: an endpoint is {{ domain = NAME, id = NUMBER }}", "channel", i,
                               "endpoints")
            domain, number = e["domain"], e["id"]
            if domain not in known:
                raise at.error(f"channel {name!r}: endpoint names unknown domain {domain!r}", "channel", i,
                               "endpoints")
            if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 1 << 32:
                raise at.error(f"channel {name!r}: endpoint id must be a channel number (0 .. 2^32-1)", "channel",
                               i, "endpoints")
            if (domain, number) in used:
                raise at.error(f"channel {name!r}: domain {domain!r} already has a channel {number}", "channel", i,
                               "endpoints")
            used.add((domain, number))
            pair.append((domain, number))
        if pair[0][0] == pair[1][0]:
            raise at.error(f"channel {name!r}: both endpoints are in domain {pair[0][0]!r} (a channel joins two "
                           f"domains)", "channel", i, "endpoints")
        channels.append(ChannelSpec(name, (pair[0], pair[1])))
    return Config(path, chip, tuple(domains), tuple(channels))


def _memory(at: _Lines, value, name: str, i: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise at.error(f"domain {name!r}: memory must be a size such as \"32M\"", "domain", i, "memory")
    try:
        size = value if isinstance(value, int) else parse_size(value)
    except ValueError as exc:
        raise at.error(f"domain {name!r}: {exc}", "domain", i, "memory") from None
    if size <= 0 or size % PAGE or size > RAM_MAX:
        raise at.error(f"domain {name!r}: memory {value!r}: a multiple of 4K up to {RAM_MAX >> 20}M (the most "
                       f"popek's 32-bit machine maps)", "domain", i, "memory")
    return size


@dataclass
class DomainsResult:
    config: Config
    results: list[RunResult]
    channels: list[Channel]
    slice: int
    machines: list = None           # the domains' machines, for a caller that inspects their memory

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "chip": self.config.chip.name,
                "domains": [dict(domain=d.name, **r.to_dict()) for d, r in zip(self.config.domains, self.results)],
                "channels": [c.to_dict() for c in self.channels]}

    def render_text(self) -> str:
        c = self.config
        out = [f"popek domains {c.path}: chip {c.chip.name} ({c.chip.strands} strands), {len(c.domains)} domain"
               f"{'s' * (len(c.domains) != 1)} on dedicated strands, interleaved in slices of {self.slice:,} "
               f"guest instructions",
               "(sun4v is a model applied to popek's x86 machine: Unicorn cannot run privileged SPARC code)\n"]
        for d, r in zip(c.domains, self.results):
            out.append(f"== domain {d.name}: strand {d.strand}, {d.memory >> 20 if d.memory >= MIB else d.memory >> 10}"
                       f"{'M' if d.memory >= MIB else 'K'} of memory, guest {Path(d.guest).name}")
            out.append(r.render_text().rstrip("\n"))
            out.append("")
        for ch in self.channels:
            a, b = ch.ends
            out.append(f"channel {ch.name}: {a.domain}#{a.id} <-> {b.domain}#{b.id}, {ch.entries} entr"
                       f"{'y' if ch.entries == 1 else 'ies'} copied")
        return "\n".join(out) + "\n"


def run_domains(config: Config, max_instructions: int, slice_: int = DEFAULT_SLICE,
                profile="ultrasparc-t1") -> DomainsResult:
    """Run every domain of ``config`` to its end (module docstring)."""
    from popek.cost import apply
    from popek.machine.guest import SOURCE_SUFFIXES, load_guest
    from popek.machine.machine import Machine
    from popek.monitors.base import Run
    from popek.monitors.sun4v.monitor import Sun4v

    if slice_ < 1:
        raise UsageError("--slice must be at least 1")
    channels = [Channel.between(spec.name, *spec.endpoints) for spec in config.channels]
    runs, builds = [], {}
    for d in config.domains:
        defines = {"SUN4V": 1} if d.guest.endswith(SOURCE_SUFFIXES) else None
        try:
            if d.guest not in builds:           # one build per guest file (machine.load checks it fits)
                builds[d.guest] = load_guest(d.guest, ram_size=d.memory, defines=defines)
            guest = builds[d.guest]
            machine = Machine(ram_size=d.memory)
            machine.load(guest)
        except PopekError as exc:
            raise BadInput(f"{config.path}:{d.line}: domain {d.name!r}: {exc}") from None
        ends = {end.id: end for ch in channels for end in ch.ends if end.domain == d.name}
        runs.append(Run(machine, Sun4v(d.name, ends), max_instructions))
    running = list(runs)
    while running:
        progressed = False
        for r in running:
            before = (r.machine.instructions, r.machine.time)
            r.step(slice_)
            progressed |= (r.machine.instructions, r.machine.time) != before or r.machine.end is not None
        running = [r for r in running if r.machine.end is None]
        if running and not progressed:          # every one waits in cpu_yield for another: none can wake
            for r in running:
                r.machine.finish(HLT, None, "cpu_yield: every running domain waits for a channel entry no "
                                            "domain can send")
                r.step()
            running = []
    results = []
    for r in runs:
        result = r.result()
        result.extra.pop("note", None)          # said once, in the header of the text
        if profile is not None:
            apply(result, profile)
        results.append(result)
    return DomainsResult(config, results, channels, slice_, [r.machine for r in runs])
