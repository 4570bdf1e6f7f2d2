"""The scan result as a typed document (DESIGN §3.2). Renderers read only this; they never re-scan.

``ScanDocument.to_dict()`` is the JSON contract; ``from_dict()`` loads a saved result back (and rejects
unknown keys), so a saved JSON can be re-rendered as text, SARIF or CSV without scanning again.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from popek import __version__
from popek.tabular import Tabular

SCHEMA = 1

# Report classes in the order the text report shows them (DESIGN §3.1/3.2).
CLASSES = ("sensitive-unprivileged", "privileged", "io", "extended")


def verdict(count: int, model: str = "ia32") -> str:
    """The one-line conclusion. Says "found" (not "absent") because a static sweep can miss code."""
    if count == 0:
        return ("VERDICT: no sensitive-unprivileged instruction found — every sensitive instruction seen here "
                "traps, so trap-and-emulate can handle it (Popek-Goldberg Theorem 1's condition holds for this code)")
    where = "on IA-32" if model == "ia32" else f"under the {model} model"
    noun = "instruction" if count == 1 else "instructions"
    return (f"VERDICT: {count} sensitive-unprivileged {noun} — classic trap-and-emulate cannot virtualize this "
            f"code faithfully (Popek-Goldberg Theorem 1 fails {where})")


def user_mode_verdict(user: int, sensitive: int, why: str) -> str:
    """For user-mode code what matters is Theorem 3: only the user-sensitive instructions behave differently
    under a monitor in a user process; the other sensitive ones matter only to a guest kernel."""
    if user == 0:
        return (f"VERDICT: user-mode code ({why}): no user-sensitive unprivileged instruction found — as a process "
                f"it behaves the same under a trap-and-emulate or hybrid monitor (Popek-Goldberg Theorem 3's "
                f"condition holds for this code)" + (f"; its {sensitive} other sensitive-unprivileged "
                f"instruction(s) matter only in a guest kernel" if sensitive else ""))
    noun = "instruction" if user == 1 else "instructions"
    return (f"VERDICT: user-mode code ({why}): {user} user-sensitive unprivileged {noun} — even as a process "
            f"it can see the monitor (Popek-Goldberg Theorem 3's condition fails for this code)")


def _check_keys(cls, data: dict, extra_ok: tuple[str, ...] = ()) -> None:
    known = {f.name for f in fields(cls)} | set(extra_ok)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")


@dataclass(frozen=True)
class Finding:
    address: int
    size: int
    bytes: bytes
    text: str            # Intel syntax, as Capstone prints it
    name: str            # canonical name (DESIGN §3.1)
    cls: str             # one of CLASSES; "class" in JSON
    region: str
    why: str             # one line: the Popek-Goldberg reason
    mode: int = 32
    reachable: bool | None = None   # recursive strategy only: reached from an entry point or symbol
    idiom: str | None = None        # VM-detection idiom recognised around this instruction
    idiom_why: str | None = None
    user_sensitive: bool = False    # behaves differently under a monitor even in a user process (Theorem 3)

    def to_dict(self) -> dict:
        d = {
            "address": f"0x{self.address:x}", "size": self.size, "bytes": self.bytes.hex(), "text": self.text,
            "name": self.name, "class": self.cls, "region": self.region, "why": self.why, "mode": self.mode,
        }
        if self.reachable is not None:
            d["reachable"] = self.reachable
        if self.idiom is not None:
            d["idiom"], d["idiom_why"] = self.idiom, self.idiom_why
        if self.user_sensitive:
            d["user_sensitive"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Finding":
        d = dict(d)
        _check_keys(cls, d, extra_ok=("class",))
        d["cls"] = d.pop("class")
        d["address"] = int(d["address"], 16)
        d["bytes"] = bytes.fromhex(d["bytes"])
        return cls(**d)


@dataclass(frozen=True)
class RegionInfo:
    name: str
    start: int
    end: int
    mode: int

    def to_dict(self) -> dict:
        return {"name": self.name, "start": f"0x{self.start:x}", "end": f"0x{self.end:x}", "mode": self.mode}

    @classmethod
    def from_dict(cls, d: dict) -> "RegionInfo":
        _check_keys(cls, d)
        return cls(d["name"], int(d["start"], 16), int(d["end"], 16), d["mode"])


@dataclass(frozen=True)
class FileReport:
    path: str
    format: str = ""
    sha256: str = ""
    regions: tuple[RegionInfo, ...] = ()
    findings: tuple[Finding, ...] = ()
    instructions: int = 0           # instructions decoded
    error: str | None = None        # set when the file could not be scanned (then nothing else is)
    warnings: tuple[str, ...] = ()  # scanned, but not all of it (a file cut short), one line each
    user_mode: str = ""             # why the headers say this is user-mode code; its verdict is Theorem 3's

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in self.findings:
            counts[f.name] = counts.get(f.name, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def sensitive_unprivileged(self) -> int:
        return sum(1 for f in self.findings if f.cls == "sensitive-unprivileged")

    @property
    def user_sensitive_unprivileged(self) -> int:
        return sum(1 for f in self.findings if f.cls == "sensitive-unprivileged" and f.user_sensitive)

    def verdict(self, model: str = "ia32") -> str:
        if self.user_mode:
            return user_mode_verdict(self.user_sensitive_unprivileged, self.sensitive_unprivileged, self.user_mode)
        return verdict(self.sensitive_unprivileged, model)

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {
            "path": self.path, "format": self.format, "sha256": self.sha256,
            "regions": [r.to_dict() for r in self.regions],
            "instructions": self.instructions,
            "findings": [f.to_dict() for f in self.findings],
            "counts": self.counts,
            **({"warnings": list(self.warnings)} if self.warnings else {}),
            **({"user_mode": self.user_mode} if self.user_mode else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FileReport":
        d = dict(d)
        _check_keys(cls, d, extra_ok=("counts",))
        d.pop("counts", None)
        d["regions"] = tuple(RegionInfo.from_dict(r) for r in d.get("regions", ()))
        d["findings"] = tuple(Finding.from_dict(f) for f in d.get("findings", ()))
        d["warnings"] = tuple(str(w) for w in d.get("warnings", ()))
        return cls(**d)


@dataclass(frozen=True)
class ScanDocument(Tabular):
    files: tuple[FileReport, ...]
    strategy: str = "linear"
    model: str = "ia32"
    extended: bool = False
    version: str = __version__
    schema: int = SCHEMA
    tool: str = "popek"
    skipped: tuple[str, ...] = ()   # files found in a directory that are not ELF or PE binaries

    @property
    def has_errors(self) -> bool:
        return any(f.error is not None for f in self.files)

    def caption(self) -> str:
        return (f"{len(self.files)} file{'s' * (len(self.files) != 1)}, {self.sensitive_unprivileged} "
                f"sensitive-unprivileged site{'s' * (self.sensitive_unprivileged != 1)} (model {self.model})")

    def table(self) -> tuple[list[str], list[list]]:
        """One row per finding (a file that could not be scanned is one row with its error)."""
        rows = []
        for f in self.files:
            if f.error is not None:
                rows.append([f.path, None, None, "error", f.error, None, None])
            rows += [[f.path, f"{x.address:#x}", x.name, x.cls, x.text, x.idiom, x.why] for x in f.findings]
        return ["file", "address", "instruction", "class", "text", "idiom", "why"], rows

    @property
    def sensitive_unprivileged(self) -> int:
        return sum(f.sensitive_unprivileged for f in self.files)

    @property
    def verdict(self) -> str:
        """The one-line conclusion over every file scanned (the text report's last line, JSON's verdict)."""
        scanned = [f for f in self.files if f.error is None]
        if self.files and not scanned:
            return "VERDICT: no file could be scanned"
        if scanned and all(f.user_mode for f in scanned):
            return user_mode_verdict(sum(f.user_sensitive_unprivileged for f in scanned), self.sensitive_unprivileged,
                                     scanned[0].user_mode if len(scanned) == 1 else "every file scanned")
        return verdict(self.sensitive_unprivileged, self.model)

    def to_dict(self) -> dict:
        return {
            "schema": self.schema, "tool": self.tool, "version": self.version,
            "strategy": self.strategy, "model": self.model, "extended": self.extended,
            "verdict": self.verdict.removeprefix("VERDICT: "),
            "files": [f.to_dict() for f in self.files],
            **({"skipped": list(self.skipped)} if self.skipped else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ScanDocument":
        d = dict(d)
        _check_keys(cls, d, extra_ok=("verdict",))
        d.pop("verdict", None)             # derived from the findings, recomputed
        if d.get("schema") != SCHEMA or d.get("tool") != "popek":
            raise ValueError("not a popek scan document (schema 1)")
        d["files"] = tuple(FileReport.from_dict(f) for f in d["files"])
        d["skipped"] = tuple(str(p) for p in d.get("skipped", ()))
        return cls(**d)
