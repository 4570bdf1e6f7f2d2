"""Cost profiles: one TOML file per processor, every number with its source or the word ``assumed``.

A profile (``popek/cost/profiles/NAME.toml``) prices the events of popek.events::

    name = "p4-2006"
    processor = "Intel Pentium 4 672 ..."
    clock-ghz = 3.8                              # for people: cycles to time

    [instructions]                               # every guest instruction, at this CPI
    cycles = 1.0
    assumed = "why this value"

    [trap]                                       # a kind of popek.events
    each = { cycles = 1086, source = "...", checked = true }    # every event of the kind, whatever its name
    [emulate]
    "*" = { cycles = 150, assumed = "..." }      # a name not listed below
    sgdt = { cycles = 120, assumed = "..." }

One event costs the kind's ``each`` plus its name's price (or ``"*"``'s); an event with neither is
*unpriced*, and the model lists it instead of counting it as zero. A price is ``cycles`` (a number >= 0)
with ``source`` (where it comes from: paper, table or figure, page; SDM section; a measurement), plus
``checked = true`` only when that text was read, or with ``assumed`` (why this value) instead; or it is
``parts = [price, ...]``, summed, each part with its own source. Loading checks all of it: an unknown kind
or name, a price for an event that costs nothing by definition (``info``), a number without source or
``assumed``, a negative number, an unknown key — each is a ``ProfileError`` naming the file and line.
"""
from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from popek import events as vocabulary
from popek.errors import SourceError, UsageError

TOP_KEYS = {"name", "processor", "clock-ghz", "instructions"}
PRICE_KEYS = {"cycles", "source", "checked", "assumed", "parts"}
EACH, OTHERS = "each", "*"


class ProfileError(SourceError):
    """A profile that does not load: ``FILE:LINE: message``."""


@dataclass(frozen=True)
class Price:
    cycles: float
    source: str | None = None       # None: assumed
    checked: bool = False
    assumed: str | None = None
    parts: tuple[Price, ...] = ()

    @property
    def is_assumed(self) -> bool:
        return any(p.is_assumed for p in self.parts) if self.parts else self.assumed is not None

    @property
    def provenance(self) -> str:
        """One line: where the number comes from, as a user reads it."""
        if self.parts:
            return " + ".join(f"{p.cycles:g} ({p.provenance})" for p in self.parts)
        if self.source is not None:
            return f"{self.source} [{'checked' if self.checked else 'not checked'}]"
        return f"assumed: {self.assumed}"


@dataclass(frozen=True)
class Profile:
    name: str
    processor: str
    clock_ghz: float | None
    instructions: Price                              # per guest instruction
    prices: dict[tuple[str, str], Price]             # (kind, name | EACH | OTHERS) -> price
    path: str

    def price(self, kind: str, name: str) -> float | None:
        """Cycles one event (kind, name) costs, or None when this profile cannot price it."""
        each = self.prices.get((kind, EACH))
        own = self.prices.get((kind, name)) or self.prices.get((kind, OTHERS))
        if each is None and own is None:
            return None
        return (each.cycles if each else 0.0) + (own.cycles if own else 0.0)

    def is_assumed(self, kind: str, name: str) -> bool:
        """Whether any number in the price of (kind, name) is assumed."""
        used = (self.prices.get((kind, EACH)), self.prices.get((kind, name)) or self.prices.get((kind, OTHERS)))
        return any(p is not None and p.is_assumed for p in used)

    def rows(self) -> list[tuple[str, Price]]:
        """Every number, for ``popek profiles NAME``: ('instructions' or 'kind.name', price)."""
        return [("instructions", self.instructions)] + [(f"{k}.{n}", p) for (k, n), p in self.prices.items()]


# --- loading ---------------------------------------------------------------------------------------------
def directory() -> Path:
    return Path(str(resources.files("popek.cost") / "profiles"))


def names() -> list[str]:
    return sorted(p.stem for p in directory().glob("*.toml"))


def load(name_or_path: str) -> Profile:
    """A bundled profile by name, or a profile file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = directory() / f"{name_or_path}.toml"
        if not path.is_file():
            raise UsageError(f"unknown profile {name_or_path!r} (known: {', '.join(names())})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read profile {str(path)!r}: {exc}") from None
    return parse(text, str(path))


def parse(text: str, file: str = "<profile>") -> Profile:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise ProfileError(str(exc).split(" (at ")[0], file, int(line.group(1)) if line else None) from None
    where = _Locator(text)

    def fail(message: str, table: str | None = None, key: str | None = None):
        raise ProfileError(message, file, where.line(table, key))

    for key in ("name", "processor", "instructions"):
        if key not in doc:
            fail(f"missing {key!r}")
    for key, value in doc.items():
        if key not in TOP_KEYS and not isinstance(value, dict):
            fail(f"unknown key {key!r}", None, key)
    if not isinstance(doc["name"], str) or not isinstance(doc["processor"], str):
        fail("'name' and 'processor' must be strings", None, "name")
    clock = doc.get("clock-ghz")
    if clock is not None and (not _number(clock) or clock <= 0):
        fail("'clock-ghz' must be a positive number", None, "clock-ghz")
    instructions = _price(doc["instructions"], lambda m: fail(f"instructions: {m}", "instructions"))
    prices: dict[tuple[str, str], Price] = {}
    for kind_name, table in doc.items():
        if kind_name in TOP_KEYS:
            continue
        kind = vocabulary.KINDS.get(kind_name)
        if kind is None:
            fail(f"unknown event kind {kind_name!r} (popek/events.py lists the kinds)", kind_name)
        if kind.role == vocabulary.INFO:
            fail(f"{kind_name!r} events cost nothing by themselves: {kind.what}", kind_name)
        for event, value in table.items():
            if event not in (EACH, OTHERS):
                if not kind.knows(event):
                    fail(f"unknown event {kind_name}.{event!r}", kind_name, event)
                if kind.role_of(event) == vocabulary.INFO:
                    fail(f"{kind_name}.{event} costs nothing by itself: {kind.names[event].what}", kind_name, event)
            if not isinstance(value, dict):
                fail(f"{kind_name}.{event}: a price is a table {{cycles, source or assumed}}", kind_name, event)
            prices[(kind_name, event)] = _price(
                value, lambda m, k=kind_name, e=event: fail(f"{k}.{e}: {m}", k, e))
    return Profile(doc["name"], doc["processor"], clock, instructions, prices, file)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _price(value: dict, fail) -> Price:
    unknown = set(value) - PRICE_KEYS
    if unknown:
        fail(f"unknown key {sorted(unknown)[0]!r} (a price has {', '.join(sorted(PRICE_KEYS))})")
    if "parts" in value:
        if set(value) != {"parts"} or not isinstance(value["parts"], list) or not value["parts"]:
            fail("'parts' is a non-empty list of prices, alone in its table")
        parts = tuple(_price(p, fail) if isinstance(p, dict) else fail("a part is a price table")
                      for p in value["parts"])
        return Price(sum(p.cycles for p in parts), parts=parts)
    cycles = value.get("cycles")
    if not _number(cycles):
        fail("'cycles' must be a number")
    if cycles < 0:
        fail(f"negative cost {cycles}")
    source, assumed, checked = value.get("source"), value.get("assumed"), value.get("checked", False)
    if (source is None) == (assumed is None):
        fail("every number needs exactly one of 'source' (where it comes from) or 'assumed' (why this value)")
    if not isinstance(source or assumed, str) or not (source or assumed).strip():
        fail("'source' and 'assumed' are non-empty strings")
    if not isinstance(checked, bool):
        fail("'checked' is true or false")
    if checked and source is None:
        fail("'checked' applies to a source, not to an assumed value")
    return Price(float(cycles), source, checked, assumed)


class _Locator:
    """Line numbers for error messages: tomllib gives none for a valid document, so find the table header
    and the key in the text (the profile format keeps one price per line)."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def line(self, table: str | None, key: str | None) -> int | None:
        current = None
        header = re.compile(r"\s*\[\s*\"?([^\]\"]+)\"?\s*\]\s*(#.*)?$")
        for number, text in enumerate(self.lines, 1):
            m = header.match(text)
            if m:
                current = m.group(1).strip()
                if table is not None and key is None and current == table:
                    return number
                continue
            if key is not None and current == table:
                if re.match(rf"\s*(\"{re.escape(key)}\"|{re.escape(key)})\s*=", text):
                    return number
        return None
