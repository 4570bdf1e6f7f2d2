"""Renderers: a ScanDocument in, a string out (text, json, sarif, csv).

They read only the document and never re-scan (capa's rule), so a saved JSON result can be re-rendered in any
format by ``render(ScanDocument.from_dict(json.load(f)), fmt)``. Nothing here prints or exits: the CLI does.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import PurePosixPath
from urllib.parse import quote

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from popek.scanner.document import CLASSES, FileReport, Finding, ScanDocument

FORMATS = ("text", "json", "sarif", "csv")
TEXT_WIDTH = 120
CSV_HEADER = ("file", "address", "size", "bytes", "name", "class", "region", "mode", "reachable", "idiom",
              "text", "why")
SARIF_SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"


def render(doc: ScanDocument, fmt: str, *, max_rows_per_class: int | None = None, details: bool | None = None,
           width: int = TEXT_WIDTH) -> str:
    """The document in ``fmt`` (one of FORMATS). ``max_rows_per_class``, ``details`` and ``width`` shape only
    the text report (see ``render_text``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "text":
        return render_text(doc, max_rows_per_class=max_rows_per_class, details=details, width=width)
    return {"json": render_json, "sarif": render_sarif, "csv": render_csv}[fmt](doc)


# ---------------------------------------------------------------------------------------------- json

def render_json(doc: ScanDocument) -> str:
    """The DESIGN §3.2 contract: exactly ``doc.to_dict()``, one finding per line.

    json.dumps with ``indent`` runs the pure-Python encoder (CPython uses its C encoder only without
    indent), which was a fifth of a scan with many findings: each finding is encoded by the C encoder on a
    line of its own instead, and only the few outer levels are laid out here."""
    encode = json.JSONEncoder().encode      # no indent: the C encoder
    d = doc.to_dict()
    files = []
    for report in d.pop("files"):
        findings = report.pop("findings", None)
        head = encode(report)
        if findings:
            head = head[:-1] + ', "findings": [\n    ' + ",\n    ".join(map(encode, findings)) + "\n  ]}"
        elif findings is not None:
            head = head[:-1] + ', "findings": []}'
        files.append(head)
    outer = encode(d)
    return outer[:-1] + ', "files": [\n  ' + ",\n  ".join(files) + "\n]}"


# ---------------------------------------------------------------------------------------------- text

def render_text(doc: ScanDocument, *, max_rows_per_class: int | None = None, details: bool | None = None,
                width: int = TEXT_WIDTH) -> str:
    """Several files: a summary table (one row per file) first, then the per-file blocks only with
    ``details``; one file: its block. The verdict sentence comes once, last. ``width``: the terminal's."""
    assert max_rows_per_class is None or max_rows_per_class >= 0
    details = len(doc.files) == 1 if details is None else details
    # color_system=None and force_terminal=False: plain text whatever stdout is; the CLI may print it anywhere.
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False,
                      highlight=False, emoji=False, markup=False)
    console.print(f"popek {doc.version} scan — strategy {doc.strategy}, model {doc.model}"
                  f"{', extended' if doc.extended else ''}, {len(doc.files)} file(s)")
    if len(doc.files) > 1:
        console.print()
        for text in _summary_lines(doc):
            console.print(text, soft_wrap=True)
        console.print()
        console.print(SUMMARY_LEGEND)
        if not details:
            console.print("(per-file findings: --details)")
    for report in doc.files if details else ():
        console.print()
        _file_text(console, report, max_rows_per_class)
    console.print()
    if doc.skipped:
        console.print(f"skipped {len(doc.skipped)} file(s) that are not ELF or PE binaries: "
                      + ", ".join(doc.skipped), soft_wrap=True)
    failed = sum(1 for f in doc.files if f.error is not None)
    if failed:
        console.print(f"{failed} file(s) could not be scanned" + (" (see ERROR above)" if details else ":"))
        for report in () if details else (f for f in doc.files if f.error is not None):
            console.print(f"  {report.path}: {report.error}", soft_wrap=True)
    # soft_wrap: a verdict stays on one line, so `grep VERDICT` and the tests see it whole.
    console.print(doc.verdict, soft_wrap=True)
    # rich pads every line to the console width; trailing blanks only make diffs noisy.
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"


def _short_verdict(report: FileReport, model: str) -> str:
    if report.error is not None:
        return "error"                      # (why: listed under the table, a line per file)
    if report.user_mode:
        return "user mode: Theorem 3 " + ("holds" if not report.user_sensitive_unprivileged else "fails")
    return "Theorem 1 " + ("holds" if not report.sensitive_unprivileged else "fails")


SUMMARY_LEGEND = ("sens.: sensitive-unprivileged, priv.: privileged, io: I/O instructions; idioms: VM-detection "
                  "idioms recognised")


def _summary_lines(doc: ScanDocument) -> list[str]:
    """One line per file, its name last and whole (as ``wc`` and ``ls -l`` put it): a folded name cannot be
    found with ``grep`` or copied, and a long one only runs past the terminal's edge."""
    header = ("format", "sens.", "priv.", "io", "idioms", "verdict", "file")
    rows = []
    for report in doc.files:
        by = {cls: sum(1 for f in report.findings if f.cls == cls) for cls in CLASSES}
        counts = [by["sensitive-unprivileged"], by["privileged"], by["io"],
                  sum(1 for f in report.findings if f.idiom is not None)]
        if report.error is not None:
            counts = ["-"] * 4
        rows.append((report.format or "-", *map(str, counts), _short_verdict(report, doc.model), report.path))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    right = {1, 2, 3, 4}                              # the counts

    def line(cells) -> str:
        fields = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  " + "   ".join(fields) + "   " + cells[-1]
    return [line(header), "  " + "-" * (sum(widths) + 3 * len(widths) + len("file")), *map(line, rows)]


def _file_text(console: Console, report: FileReport, cap: int | None) -> None:
    # A file name is never wrapped or folded: it must stay whole for `grep` and for copying.
    console.print(f"== {report.path}", soft_wrap=True)
    if report.error is not None:
        console.print(f"ERROR: {report.error}")
        return
    regions = ", ".join(f"{r.name} 0x{r.start:x}-0x{r.end:x} ({r.mode}-bit)" for r in report.regions) or "none"
    console.print(f"format {report.format or '?'}, sha256 {report.sha256 or '?'}")
    console.print(f"regions: {regions}; {report.instructions} instructions decoded")
    for warning in report.warnings:
        console.print(f"WARNING: {warning}")
    if not report.findings:
        console.print("no findings")
    for cls in CLASSES:
        rows = [f for f in report.findings if f.cls == cls]
        if rows:
            console.print()
            console.print(_class_table(cls, rows, cap))
    if report.findings:
        console.print()
        console.print(_counts_table(report))


def _class_table(cls: str, rows: list[Finding], cap: int | None) -> Table | Text:
    # bytes and instruction are capped (they wrap) so the prose columns keep room at 120 columns; rich wraps
    # rather than crops when the row is still too wide. Optional columns appear only when some finding of the table carries them, so a linear scan without
    # idioms keeps the table narrow enough to read.
    show_reach = any(f.reachable is not None for f in rows)
    show_idiom = any(f.idiom is not None for f in rows)
    table = Table(title=Text(f"{cls} ({len(rows)})"), title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("address", no_wrap=True)
    table.add_column("bytes", overflow="fold", max_width=21)
    table.add_column("instruction", overflow="fold", max_width=32)
    table.add_column("name", no_wrap=True)
    if show_reach:
        table.add_column("reachable", no_wrap=True)
    if show_idiom:
        table.add_column("idiom", overflow="fold")
    table.add_column("why", overflow="fold")
    shown = rows if cap is None else rows[:cap]
    if not shown:   # a cap of 0: the heading and the count are the report
        return Text(f"{cls} ({len(rows)}): {len(rows)} finding(s) not shown")
    for f in shown:
        cells = [f"0x{f.address:x}", f.bytes.hex(" "), f.text, f.name]
        if show_reach:
            cells.append("?" if f.reachable is None else ("yes" if f.reachable else "no"))
        if show_idiom:
            cells.append("" if f.idiom is None else f"{f.idiom}: {f.idiom_why}")
        cells.append(f.why)
        table.add_row(*(Text(c) for c in cells))
    if len(shown) < len(rows):
        table.caption = Text(f"… {len(rows) - len(shown)} more {cls} finding(s) not shown")
        table.caption_justify = "left"
    return table


def _counts_table(report: FileReport) -> Table:
    cls_of = {f.name: f.cls for f in report.findings}
    table = Table(title=Text("counts by canonical name"), title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("name")
    table.add_column("class")
    table.add_column("count", justify="right")
    for name, n in report.counts.items():
        table.add_row(Text(name), Text(cls_of[name]), Text(str(n)))
    return table


# ---------------------------------------------------------------------------------------------- csv

def render_csv(doc: ScanDocument) -> str:
    """One row per finding. A file that could not be scanned gets one row with class ``error`` and the
    message in ``why``, so the failure is not silently lost from a flat table."""
    out = io.StringIO()
    writer = csv.writer(out)   # RFC 4180 CRLF rows: a CR inside a field then gets quoted too
    writer.writerow(CSV_HEADER)
    for report in doc.files:
        if report.error is not None:
            writer.writerow([report.path, "", "", "", "", "error", "", "", "", "", "", report.error])
            continue
        for f in report.findings:
            reach = "" if f.reachable is None else str(f.reachable).lower()
            writer.writerow([report.path, f"0x{f.address:x}", f.size, f.bytes.hex(), f.name, f.cls, f.region,
                             f.mode, reach, f.idiom or "", f.text, f.why])
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- sarif

def _uri(path: str) -> str:
    """A SARIF artifact URI: ``file://`` for absolute paths, a percent-encoded relative reference otherwise."""
    posix = path.replace("\\", "/")
    if posix.startswith("/"):
        return PurePosixPath(posix).as_uri()
    return quote(posix)


def _message(f: Finding) -> str:
    """Sentences: what the instruction is, why it matters, and the idiom it belongs to."""
    article = "an" if f.cls[0] in "aeiou" else "a"
    text = f"{f.text} at 0x{f.address:x} is {article} {f.cls} instruction ({f.name}): {_sentence(f.why)}"
    if f.idiom is not None:
        text += f" It is part of the VM-detection idiom {f.idiom}: {_sentence(f.idiom_why)}"
    return text


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith(".") else text + "."


def _rules(doc: ScanDocument) -> list[dict]:
    # One rule per canonical name that occurs; the first finding's why describes it (all findings of one
    # canonical name share the classifier's reason).
    first: dict[str, Finding] = {}
    for report in doc.files:
        for f in report.findings:
            first.setdefault(f.name, f)
    return [{
        "id": name,
        "shortDescription": {"text": f"{name}: {f.cls} instruction"},
        "fullDescription": {"text": f.why},
        "defaultConfiguration": {"level": _level(f.cls)},
        "properties": {"class": f.cls},
    } for name, f in sorted(first.items())]


def _level(cls: str) -> str:
    # Only sensitive-unprivileged instructions break trap-and-emulate; the others trap or are opt-in.
    return "warning" if cls == "sensitive-unprivileged" else "note"


def _result(f: Finding, report: FileReport, artifact: int, rule_index: int) -> dict:
    # The document has virtual addresses, not file offsets, so no physicalLocation.region is given (an
    # invented byteOffset would point at the wrong bytes); SARIF's own address object carries the address.
    props = {"address": f"0x{f.address:x}", "class": f.cls, "region": f.region, "mode": f.mode,
             "bytes": f.bytes.hex(), "text": f.text}
    if f.reachable is not None:
        props["reachable"] = f.reachable
    if f.idiom is not None:
        props["idiom"], props["idiom_why"] = f.idiom, f.idiom_why
    return {
        "ruleId": f.name,
        "ruleIndex": rule_index,
        "level": _level(f.cls),
        "message": {"text": _message(f)},
        "locations": [{
            "physicalLocation": {
                "artifactLocation": {"uri": _uri(report.path), "index": artifact},
                "address": {"absoluteAddress": f.address, "length": f.size, "kind": "instruction",
                            "name": f.region},
            },
            "logicalLocations": [{"name": f"0x{f.address:x}", "fullyQualifiedName": f"{f.region}!0x{f.address:x}",
                                  "kind": "instruction"}],
        }],
        "partialFingerprints": {"popekFinding/v1": f"{report.sha256}:{f.address:x}:{f.name}"},
        "properties": props,
    }


def render_sarif(doc: ScanDocument) -> str:
    """SARIF 2.1.0, one run. Errors become invocation notifications, so the log still validates."""
    rules = _rules(doc)
    rule_index = {r["id"]: i for i, r in enumerate(rules)}
    artifacts, results, notes = [], [], []
    for report in doc.files:
        artifact = {"location": {"uri": _uri(report.path)}, "roles": ["analysisTarget"]}
        if report.sha256:
            artifact["hashes"] = {"sha-256": report.sha256}
        if artifact not in artifacts:          # a file named twice is one artifact (the schema wants them unique)
            artifacts.append(artifact)
        i = artifacts.index(artifact)
        where = [{"physicalLocation": {"artifactLocation": {"uri": _uri(report.path), "index": i}}}]
        if report.error is not None:
            notes.append({"level": "error", "message": {"text": f"{report.path}: {report.error}"}, "locations": where})
        for warning in report.warnings:
            notes.append({"level": "warning", "message": {"text": f"{report.path}: {warning}."}, "locations": where})
        for f in report.findings:
            results.append(_result(f, report, i, rule_index[f.name]))
    notes += [{"level": "note", "message": {"text": f"{path} skipped: not an ELF or PE binary."}}
              for path in doc.skipped]
    log = {
        "$schema": SARIF_SCHEMA_URI,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "popek", "version": doc.version, "rules": rules}},
            "invocations": [{"executionSuccessful": not doc.has_errors, "toolExecutionNotifications": notes}],
            "artifacts": artifacts,
            "results": results,
            "properties": {"strategy": doc.strategy, "model": doc.model, "extended": doc.extended,
                           "popekSchema": doc.schema},
        }],
    }
    return json.dumps(log, indent=2)
