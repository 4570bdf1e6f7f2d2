"""Renderers read only a ScanDocument: hand-built documents in, text/json/sarif/csv out."""
from __future__ import annotations

import csv
import functools
import io
import json
from dataclasses import replace
from importlib import resources

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popek.scanner.document import CLASSES, FileReport, Finding, RegionInfo, ScanDocument
from popek.scanner.document import verdict
from popek.scanner.render import CSV_HEADER, FORMATS, render

SHA = "9f" * 32
SIDT_WHY = "stores IDTR at any CPL: the guest reads the monitor's IDT base"


def finding(address, name, cls, text, raw, why, **kw) -> Finding:
    return Finding(address, len(raw), raw, text, name, cls, ".text", why, **kw)


FINDINGS = (
    finding(0x401000, "sidt", "sensitive-unprivileged", "sidt [esp]", b"\x0f\x01\x0c\x24", SIDT_WHY,
            reachable=True, idiom="redpill", idiom_why="top byte of the IDT base compared with 0xD0"),
    finding(0x401010, "pushf", "sensitive-unprivileged", "pushfd", b"\x9c",
            "shows IF and IOPL at any CPL", reachable=False),
    finding(0x401011, "sidt", "sensitive-unprivileged", "sidt [eax]", b"\x0f\x01\x08", SIDT_WHY),
    finding(0x401020, "cpuid", "privileged", "cpuid", b"\x0f\xa2", "exits under VT-x, faults under nothing"),
    finding(0x401030, "in", "io", "in al, dx", b"\xec", "I/O port read: traps when CPL > IOPL, comma, \"quoted\""),
    finding(0x401031, "int3", "extended", "int3", b"\xcc", "breakpoint trap"),
)
GOOD = FileReport("bin/guest one.elf", "elf", SHA, (RegionInfo(".text", 0x401000, 0x402000, 32),), FINDINGS, 1234)
CLEAN = FileReport("clean.bin", "raw", "00" * 32, (RegionInfo("raw", 0x7C00, 0x7E00, 16),),
                   (finding(0x7C00, "cpuid", "privileged", "cpuid", b"\x0f\xa2", "traps"),), 10)
BROKEN = FileReport("broken.elf", error="truncated ELF: program header 3 past end of file")
DOC = ScanDocument((GOOD, CLEAN, BROKEN), strategy="recursive")


@functools.lru_cache(maxsize=None)
def _validator():
    schema = json.loads(resources.files("popek.scanner").joinpath("data/sarif-schema-2.1.0.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture
def sarif_validator():
    return _validator()


# --------------------------------------------------------------------------------------------- text

def test_text_groups_by_class_in_order_and_ends_with_the_verdict():
    text = render(DOC, "text", details=True)
    headings = [text.index(f"{cls} (") for cls in CLASSES]
    assert headings == sorted(headings)
    assert "sensitive-unprivileged (3)" in text and "privileged (1)" in text
    for column in ("address", "bytes", "instruction", "name", "why", "reachable", "idiom"):
        assert column in text
    assert "0x401000" in text and "0f 01 0c 24" in text and "redpill" in text
    assert "counts by canonical name" in text
    lines = text.rstrip("\n").splitlines()
    assert lines[-1] == verdict(3)
    assert lines[-1].startswith("VERDICT: 3 sensitive-unprivileged instructions") and "Theorem 1" in lines[-1]


@pytest.mark.parametrize("width", [80, 120, 200])
def test_text_is_plain_and_fits_the_width(width):
    text = render(DOC, "text", details=True, width=width)
    assert "\x1b[" not in text
    assert all(len(line) <= width for line in text.splitlines() if not line.startswith("VERDICT"))
    # the prose column uses the room: fewer lines at 200 columns than at 80
    if width == 200:
        assert len(text.splitlines()) < len(render(DOC, "text", details=True, width=80).splitlines())


def test_several_files_get_a_summary_table_first_and_blocks_only_with_details():
    text = render(DOC, "text", width=200)
    table = text[:text.index("(per-file findings: --details)")]
    for cell in ("bin/guest one.elf", "clean.bin", "broken.elf", "Theorem 1 fails", "Theorem 1 holds", "error"):
        assert cell in table
    assert "== bin/guest" not in text and "sensitive-unprivileged (3)" not in text
    assert text.count("VERDICT") == 1 and "file verdict" not in text
    assert "  broken.elf: truncated ELF: program header 3 past end of file" in text   # why, under the table
    assert all(len(line) <= 80 for line in render(DOC, "text", width=80).splitlines() if not line.startswith("VERDICT"))
    detailed = render(DOC, "text", details=True)
    assert detailed.index("clean.bin") < detailed.index("== bin/guest one.elf")       # the summary comes first
    assert "ERROR: truncated ELF: program header 3 past end of file" in detailed
    assert "1 file(s) could not be scanned" in detailed and detailed.count("VERDICT") == 1


def test_a_long_file_name_stays_whole_and_last_in_the_summary():
    long = "/usr/lib/x86_64-linux-gnu/some/deep/directory/of/libraries/libexample-with-a-long-name.so.6"
    doc = ScanDocument((replace(GOOD, path=long), CLEAN))
    lines = render(doc, "text", width=80).splitlines()
    row = next(line for line in lines if "Theorem 1 fails" in line)
    assert row.endswith("   " + long)                  # one line, the name whole: grep finds it, a copy works
    assert len(row[:-len(long)]) <= 80
    assert row.index("Theorem 1 fails") < row.index(long)


def test_text_cap_per_class():
    text = render(DOC, "text", max_rows_per_class=1, details=True)
    assert "2 more sensitive-unprivileged finding(s) not shown" in text
    assert "0x401011" not in text.split("counts by canonical name")[0]
    assert "sensitive-unprivileged (3): 3 finding(s) not shown" in render(DOC, "text", max_rows_per_class=0, details=True)


def test_text_of_a_clean_document():
    text = render(ScanDocument((CLEAN,)), "text")
    assert text.rstrip().splitlines()[-1].startswith("VERDICT: no sensitive-unprivileged instruction found")
    assert "idiom" not in text and "reachable" not in text   # optional columns only when present


def test_markup_in_data_is_printed_literally():
    f = finding(0x10, "sidt", "sensitive-unprivileged", "sidt [bold]", b"\x0f\x01\x08", "[red]why[/red]")
    text = render(ScanDocument((FileReport("[x].bin", "raw", SHA, (), (f,), 1),)), "text")
    assert "[bold]" in text and "[red]why[/red]" in text and "[x].bin" in text


# --------------------------------------------------------------------------------------------- json

def test_json_round_trips():
    data = json.loads(render(DOC, "json"))
    assert data["schema"] == 1 and data["tool"] == "popek"
    assert ScanDocument.from_dict(data) == DOC


# --------------------------------------------------------------------------------------------- sarif

def test_sarif_validates_and_carries_rules_results_artifacts(sarif_validator):
    log = json.loads(render(DOC, "sarif"))
    sarif_validator.validate(log)
    assert log["version"] == "2.1.0" and len(log["runs"]) == 1
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "popek" and driver["version"] == DOC.version
    rules = {r["id"]: r for r in driver["rules"]}
    assert set(rules) == {"sidt", "pushf", "cpuid", "in", "int3"}
    assert rules["sidt"]["fullDescription"]["text"] == SIDT_WHY
    assert rules["sidt"]["properties"]["class"] == "sensitive-unprivileged"
    results = run["results"]
    assert len(results) == len(FINDINGS) + 1
    assert all(driver["rules"][r["ruleIndex"]]["id"] == r["ruleId"] for r in results)
    first = results[0]
    assert first["ruleId"] == "sidt" and first["level"] == "warning"
    assert SIDT_WHY in first["message"]["text"] and "redpill" in first["message"]["text"]
    loc = first["locations"][0]
    assert loc["physicalLocation"]["artifactLocation"]["uri"] == "bin/guest%20one.elf"
    assert loc["physicalLocation"]["address"]["absoluteAddress"] == 0x401000
    assert "region" not in loc["physicalLocation"]       # no file offset in the document: none invented
    assert loc["logicalLocations"][0]["name"] == "0x401000"
    assert first["properties"]["address"] == "0x401000" and first["properties"]["idiom"] == "redpill"
    assert {r["level"] for r in results if r["ruleId"] != "sidt" and r["ruleId"] != "pushf"} == {"note"}
    assert run["artifacts"][0]["hashes"] == {"sha-256": SHA}


def test_sarif_reports_errors_as_notifications(sarif_validator):
    log = json.loads(render(DOC, "sarif"))
    invocation = log["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is False
    notes = invocation["toolExecutionNotifications"]
    assert len(notes) == 1 and notes[0]["level"] == "error" and "truncated ELF" in notes[0]["message"]["text"]
    only_ok = json.loads(render(ScanDocument((CLEAN,)), "sarif"))
    sarif_validator.validate(only_ok)
    assert only_ok["runs"][0]["invocations"][0]["executionSuccessful"] is True


def test_sarif_of_an_empty_document(sarif_validator):
    log = json.loads(render(ScanDocument(()), "sarif"))
    sarif_validator.validate(log)
    assert log["runs"][0]["results"] == [] and log["runs"][0]["tool"]["driver"]["rules"] == []


def test_sarif_absolute_paths_become_file_uris():
    log = json.loads(render(ScanDocument((FileReport("/tmp/a b.bin", "raw", SHA, (), (), 0),)), "sarif"))
    assert log["runs"][0]["artifacts"][0]["location"]["uri"] == "file:///tmp/a%20b.bin"


# --------------------------------------------------------------------------------------------- csv

def test_csv_parses_back():
    rows = list(csv.reader(io.StringIO(render(DOC, "csv"))))
    assert tuple(rows[0]) == CSV_HEADER
    records = [dict(zip(CSV_HEADER, r)) for r in rows[1:]]
    assert len(records) == len(FINDINGS) + 1 + 1        # GOOD, CLEAN, and one row for the broken file
    first = records[0]
    assert first == {"file": "bin/guest one.elf", "address": "0x401000", "size": "4", "bytes": "0f010c24",
                     "name": "sidt", "class": "sensitive-unprivileged", "region": ".text", "mode": "32",
                     "reachable": "true", "idiom": "redpill", "text": "sidt [esp]", "why": SIDT_WHY}
    assert records[1]["reachable"] == "false" and records[2]["reachable"] == ""
    assert records[4]["why"] == FINDINGS[4].why                  # commas and quotes survive
    assert records[-1]["class"] == "error" and records[-1]["file"] == "broken.elf"


# --------------------------------------------------------------------------------------------- all formats

def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format"):
        render(DOC, "xml")


names = st.sampled_from(["sgdt", "sidt", "smsw", "pushf", "in", "cpuid", "lgdt", "syscall", "mov_to_seg"])
findings = st.builds(
    Finding, address=st.integers(0, 2**64 - 1), size=st.integers(1, 15), bytes=st.binary(min_size=1, max_size=15),
    text=st.text(max_size=40), name=names, cls=st.sampled_from(CLASSES), region=st.text(min_size=1, max_size=8),
    why=st.text(max_size=60), mode=st.sampled_from([16, 32, 64]), reachable=st.none() | st.booleans(),
    idiom=st.none()).flatmap(lambda f: st.sampled_from(
        [f, replace(f, idiom="redpill", idiom_why="top byte compared with 0xD0")]))   # idiom_why only with idiom
reports = st.builds(FileReport, path=st.text(min_size=1, max_size=30), format=st.just("raw"),
                    sha256=st.just(SHA), findings=st.lists(findings, max_size=5).map(tuple),
                    instructions=st.integers(0, 10**6)) | st.builds(FileReport, path=st.text(min_size=1, max_size=9),
                                                                    error=st.text(min_size=1, max_size=40))


@settings(max_examples=50, deadline=None)
@given(files=st.lists(reports, max_size=3).map(tuple))
def test_every_format_renders_any_document(files):
    doc = ScanDocument(files)
    for fmt in FORMATS:
        assert isinstance(render(doc, fmt), str)
    assert ScanDocument.from_dict(json.loads(render(doc, "json"))) == doc
    _validator().validate(json.loads(render(doc, "sarif")))
    rows = list(csv.reader(io.StringIO(render(doc, "csv"))))
    assert len(rows) == 1 + sum(len(f.findings) if f.error is None else 1 for f in files)


def test_text_when_nothing_could_be_scanned():
    assert render(ScanDocument((BROKEN,)), "text").rstrip().splitlines()[-1] == "VERDICT: no file could be scanned"
