"""hvm control sets: which events leave the guest, as data files with a source (or ``assumed``) per setting.

A control set is a TOML file (the bundled ones are ``controls/*.toml``: ``kvm``, ``vtx-2005``, ``svm``)::

    name = "kvm"
    vendor = "vtx"                      # vtx or svm: whose exit reasons the run reports
    summary = "one line"
    [settings]
    hlt-exiting = { value = true, source = "where this is written" }
    rdtsc-exiting = { value = false, assumed = "why we believe it" }

Every setting of ``SETTINGS`` must be given, each with ``source`` or ``assumed``; ``--control KEY=VALUE``
changes one after loading (the change is recorded as its source). The exit lines of the ISA description
(``model vtx`` / ``model svm``) name these settings as the controls of each exit.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from popek.errors import BadInput, UsageError
from popek.machine.faults import NAMES as VECTOR_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:                                                   # pragma: no cover - Python 3.10
    import tomli as tomllib

BOOL, INT, VECTORS, PORTS, MSRS, TEXT = "on/off", "a number", "vectors", "ports", "MSRs", "text"
# Every setting, its type and what it means (docs/hvm.md has the same list for users).
SETTINGS: dict[str, tuple[str, str]] = {
    "nested-paging": (BOOL, "EPT/NPT: the guest's own page tables translate; no CR3, INVLPG or #PF exits"),
    "external-interrupt-exiting": (BOOL, "an interrupt from the PIC exits; the monitor injects it"),
    "interrupt-window-exiting": (BOOL, "the monitor may ask for an exit when the guest's IF becomes 1"),
    "hlt-exiting": (BOOL, "hlt exits"),
    "invlpg-exiting": (BOOL, "invlpg exits"),
    "rdpmc-exiting": (BOOL, "rdpmc exits"),
    "rdtsc-exiting": (BOOL, "rdtsc exits"),
    "mov-dr-exiting": (BOOL, "mov to and from a debug register exits"),
    "unconditional-io-exiting": (BOOL, "every in/out/ins/outs exits (when there is no io-bitmap)"),
    "io-bitmap": (PORTS, "off, or the ports whose accesses exit (the I/O bitmaps take precedence)"),
    "msr-bitmap": (MSRS, "off (every rdmsr/wrmsr exits), or the MSRs whose accesses exit"),
    "cr0-mask": (INT, "CR0 guest/host mask: a mov to CR0 that changes one of these bits exits"),
    "cr4-mask": (INT, "CR4 guest/host mask"),
    "cr3-load-exiting": (BOOL, "mov to CR3 exits"),
    "cr3-store-exiting": (BOOL, "mov from CR3 exits"),
    "descriptor-table-exiting": (BOOL, "lgdt lidt lldt ltr sgdt sidt sldt str exit"),
    "wbinvd-exiting": (BOOL, "wbinvd exits"),
    "exception-bitmap": (VECTORS, "the exceptions that exit (by name, #PF, or vector number)"),
    "cpuid-intercept": (BOOL, "SVM: cpuid exits (on VT-x cpuid always exits)"),
    "pushf-intercept": (BOOL, "SVM only: pushf exits"),
    "popf-intercept": (BOOL, "SVM only: popf exits"),
    "iret-intercept": (BOOL, "SVM only: iret exits"),
    "swint-intercept": (BOOL, "SVM only: int n exits"),
    "cpuid-hypervisor-bit": (BOOL, "CPUID.1:ECX[31] reads 1 and leaves 0x40000000+ name the hypervisor"),
    "cpuid-vendor": (TEXT, "the 12-byte signature of CPUID leaf 0x40000000"),
}
VENDORS = ("vtx", "svm")
_VECTOR_BY_NAME = {v.lower(): k for k, v in VECTOR_NAMES.items()}
_ON, _OFF = ("on", "true", "yes", "1"), ("off", "false", "no", "0", "none")


@dataclass
class Controls:
    """A loaded control set: ``values[key]`` (normalised) and ``origin[key]`` (its source or assumption)."""

    name: str
    vendor: str
    summary: str
    path: str
    values: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)

    def __getitem__(self, key: str):
        return self.values[key]

    def set(self, assignment: str) -> None:
        """Apply ``KEY=VALUE`` (``--control``); UsageError on an unknown key or a bad value."""
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep:
            raise UsageError(f"--control {assignment!r}: expected KEY=VALUE")
        if key not in SETTINGS:
            raise UsageError(f"--control: unknown control {key!r} (known: {', '.join(SETTINGS)})")
        self.values[key] = _parse_text(key, text.strip(), f"--control {key}")
        self.origin[key] = f"--control {assignment}"

    def to_dict(self) -> dict:
        return {"name": self.name, "vendor": self.vendor,
                "settings": {k: _jsonable(v) for k, v in self.values.items()}}


def bundled_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("popek.monitors.hvm").joinpath("controls").iterdir()
                  if p.name.endswith(".toml"))


def load(name_or_path: str) -> Controls:
    """A bundled control set by name, or a control file; UsageError/BadInput as one line."""
    bundled = resources.files("popek.monitors.hvm").joinpath("controls").joinpath(f"{name_or_path}.toml")
    if bundled.is_file():
        text, path = bundled.read_text(), f"{name_or_path} (bundled)"
    else:
        p = Path(name_or_path)
        if not p.is_file():
            raise UsageError(f"--controls: no control set {name_or_path!r} (bundled: {', '.join(bundled_names())}; "
                             "or a path to a control file)")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"{p}: cannot read control file: {exc}") from None
        path = str(p)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path}: not a valid control file: {exc}") from None
    return _build(doc, path)


def _build(doc: dict, path: str) -> Controls:
    def bad(message: str):
        return BadInput(f"{path}: {message}")

    vendor = doc.get("vendor")
    if vendor not in VENDORS:
        raise bad(f"'vendor' must be one of {', '.join(VENDORS)}, not {vendor!r}")
    settings = doc.get("settings")
    if not isinstance(settings, dict):
        raise bad("missing [settings] table")
    c = Controls(str(doc.get("name", Path(path).stem)), vendor, str(doc.get("summary", "")), path)
    for key, entry in settings.items():
        if key not in SETTINGS:
            raise bad(f"unknown control {key!r} (known: {', '.join(SETTINGS)})")
        if not isinstance(entry, dict) or "value" not in entry:
            raise bad(f"{key}: expected {{ value = ..., source = \"...\" }} (or assumed = \"why\")")
        origin = entry.get("source") or (f"assumed: {entry['assumed']}" if entry.get("assumed") else None)
        if not isinstance(origin, str):
            raise bad(f"{key}: every setting needs a 'source' or an 'assumed' reason")
        c.values[key] = _normalise(key, entry["value"], f"{path}: {key}")
        c.origin[key] = origin
    missing = [k for k in SETTINGS if k not in c.values]
    if missing:
        raise bad(f"missing settings: {', '.join(missing)}")
    return c


def _normalise(key: str, value, where: str):
    """A TOML value as the monitor uses it; BadInput names the setting."""
    kind = SETTINGS[key][0]
    if isinstance(value, str) and kind != TEXT:
        return _parse_text(key, value, where)
    if kind == BOOL and isinstance(value, bool):
        return value
    if kind == INT and isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFFFFFF:
        return value
    if kind == TEXT and isinstance(value, str):
        return _vendor(value, where)
    if kind in (PORTS, MSRS) and value is False:
        return None
    if kind in (VECTORS, PORTS, MSRS) and isinstance(value, list):
        return _numbers(kind, [str(v) if not isinstance(v, bool) else "?" for v in value], where)
    raise BadInput(f"{where}: expected {kind}, not {value!r}")


def _parse_text(key: str, text: str, where: str):
    kind = SETTINGS[key][0]
    low = text.lower()
    if kind == BOOL:
        if low in _ON:
            return True
        if low in _OFF:
            return False
        raise UsageError(f"{where}: expected on or off, not {text!r}")
    if kind == INT:
        try:
            value = int(text, 0)
        except ValueError:
            raise UsageError(f"{where}: expected a number, not {text!r}") from None
        if not 0 <= value <= 0xFFFFFFFF:
            raise UsageError(f"{where}: {text} does not fit in 32 bits")
        return value
    if kind == TEXT:
        return _vendor(text, where)
    if kind in (PORTS, MSRS) and low in _OFF:
        return None
    return _numbers(kind, [t for t in text.split(",") if t.strip()] if low not in ("", "none") else [], where)


def _numbers(kind: str, items: list[str], where: str) -> frozenset[int]:
    out: set[int] = set()
    top = {VECTORS: 31, PORTS: 0xFFFF, MSRS: 0xFFFFFFFF}[kind]
    for item in items:
        item = item.strip()
        if kind == VECTORS and item.lower() in _VECTOR_BY_NAME:
            out.add(_VECTOR_BY_NAME[item.lower()])
            continue
        low, _, high = item.partition("-")
        try:
            first, last = int(low, 0), int(high or low, 0)
        except ValueError:
            raise UsageError(f"{where}: {item!r} is not one of the {kind} (a number{', a range' if kind != VECTORS else ''}"
                             f"{' or a name such as #PF' if kind == VECTORS else ''})") from None
        if not 0 <= first <= last <= top or (high and kind == VECTORS):
            raise UsageError(f"{where}: {item!r} is out of range for {kind}")
        out.update(range(first, last + 1))
    return frozenset(out)


def _vendor(text: str, where: str) -> str:
    if not text.isascii() or len(text) > 12:
        raise UsageError(f"{where}: a CPUID vendor signature is at most 12 ASCII characters, not {text!r}")
    return text


def _jsonable(value):
    if isinstance(value, frozenset):
        return sorted(value)
    return value
