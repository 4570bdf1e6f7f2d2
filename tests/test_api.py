"""The Python API (popek.api): every function returns the document its command prints as JSON, shows a table in
a notebook, and raises popek's typed errors — never SystemExit, never a bare TypeError or AssertionError."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import popek
from popek.cli import main
from popek.errors import BadInput, PopekError, SourceError, UsageError
from popek.tabular import MissingExtra

ROOT = Path(__file__).resolve().parent.parent
VMDETECT = str(ROOT / "samples" / "bin" / "vmdetect")
HELLO = str(ROOT / "samples" / "guests" / "hello.s")
STORE = str(ROOT / "samples" / "guests" / "store_tables.s")


def _cli_json(capsys, *argv) -> dict:
    capsys.readouterr()
    main([*argv, "--format", "json"])
    return json.loads(capsys.readouterr().out)


def _timeless(doc):
    """The document without wall-clock times (the only thing two runs of the same guest may differ in)."""
    if isinstance(doc, dict):
        return {k: _timeless(v) for k, v in doc.items() if k not in ("wall_seconds", "version")}
    if isinstance(doc, list):
        return [_timeless(v) for v in doc]
    return doc


def test_import_popek_exposes_the_api():
    assert set(popek.API) <= set(dir(popek))
    assert all(callable(getattr(popek, name)) for name in popek.API)
    with pytest.raises(AttributeError):
        popek.no_such_function


@pytest.mark.parametrize("call, argv", [
    (lambda: popek.scan(VMDETECT), ["scan", VMDETECT]),
    (lambda: popek.scan(VMDETECT, strategy="recursive", extended=True),
     ["scan", VMDETECT, "--strategy", "recursive", "--extended"]),
    (lambda: popek.run(STORE, "trap"), ["run", STORE, "--monitor", "trap"]),
    (lambda: popek.run(HELLO, "hvm", controls="vtx-2005"), ["run", HELLO, "--monitor", "hvm", "--controls", "vtx-2005"]),
    (lambda: popek.run(HELLO, "native", profile="p4-2006"), ["run", HELLO, "--profile", "p4-2006"]),
    (lambda: popek.diff(STORE, "trap"), ["diff", STORE, "--monitor", "trap"]),
    (lambda: popek.compare([HELLO], ["trap", "bt"], "p4-2006"),
     ["compare", HELLO, "--monitors", "trap,bt", "--profile", "p4-2006"]),
    (lambda: popek.theorem("ia32"), ["theorem", "ia32"]),
    (lambda: popek.theorem(None, ROOT / "samples" / "isa" / "pdp10.isa"),
     ["theorem", "--isa", str(ROOT / "samples" / "isa" / "pdp10.isa")]),
], ids=["scan", "scan-recursive", "run-trap", "run-hvm", "run-profile", "diff", "compare", "theorem", "theorem-toy"])
def test_to_dict_is_the_commands_json_document(call, argv, capsys):
    assert _timeless(call().to_dict()) == _timeless(_cli_json(capsys, *argv))


def test_results_show_tables_in_a_notebook():
    guest = popek.assemble(STORE)
    results = [popek.scan(VMDETECT), popek.run(guest, "trap"), popek.diff(guest, "trap"),
               popek.compare([guest], ["bt"]), popek.theorem("ia32"), guest]
    for result in results:
        html = result._repr_html_()
        columns, rows = result.table()
        assert html.startswith('<table class="popek">') and "<th>" in html, type(result).__name__
        assert rows, type(result).__name__
        assert all(len(row) == len(columns) for row in rows)
    scan_html = results[0]._repr_html_()
    assert "sidt" in scan_html and "0x8049003" in scan_html
    assert "sgdt" in results[2]._repr_html_()            # the blamed instruction is in the diff's table


def test_to_dataframe_gives_the_same_table():
    pandas = pytest.importorskip("pandas", reason="the notebook extra (pip install -e '.[notebook]') is not installed")
    result = popek.compare([HELLO], ["trap"])
    frame = result.to_dataframe()
    assert isinstance(frame, pandas.DataFrame)
    columns, rows = result.table()
    assert list(frame.columns) == columns and len(frame) == len(rows) == 2
    assert list(frame["monitor"]) == ["native", "trap"]


def test_to_dataframe_without_pandas_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)    # import pandas now raises ModuleNotFoundError
    with pytest.raises(MissingExtra, match=r"pip install 'popek\[notebook\]'"):
        popek.theorem("ia32").to_dataframe()
    assert issubclass(MissingExtra, PopekError)          # the CLI would report it as one line


def test_assemble_text_and_path():
    from_text = popek.assemble('.include "console.inc"\nstart:\n    mov al, 7\n    out 0xf4, al\n')
    assert popek.run(from_text).exit.code == 7
    guest = popek.assemble(ROOT / "samples" / "guests" / "kernel.s", defines={"PV": 1})
    assert popek.run(guest, "pv").exit.reason == "exit-port"
    doc = guest.to_dict()
    assert doc["format"] == "asm" and doc["segments"][0]["address"] == "0x00100000"
    assert doc["entry"] == f"{guest.entry:#010x}" and doc["symbols"]


@pytest.mark.parametrize("call, error, fragment", [
    (lambda: popek.scan([]), UsageError, "at least one"),
    (lambda: popek.scan(VMDETECT, strategy="zigzag"), UsageError, "unknown strategy"),
    (lambda: popek.scan(VMDETECT, model="nope"), UsageError, "unknown model"),
    (lambda: popek.scan(VMDETECT, regions=["zz"]), UsageError, "bad region"),
    (lambda: popek.scan(VMDETECT, raw=True, mode=17), UsageError, "mode"),
    (lambda: popek.run("/nonexistent.s"), BadInput, "no such file"),
    (lambda: popek.run(HELLO, "vmware"), UsageError, "unknown monitor"),
    (lambda: popek.run(HELLO, "native", ring=1), UsageError, "does not apply"),
    (lambda: popek.run(HELLO, "trap", ring=7), UsageError, "ring"),
    (lambda: popek.run(HELLO, profile="pentium-pro"), UsageError, "unknown profile"),
    (lambda: popek.run(HELLO, max_instructions=-1), UsageError, "max_instructions"),
    (lambda: popek.run(HELLO, ram_size=5), UsageError, "ram_size"),
    (lambda: popek.run(HELLO, "hvm", controls="nope"), UsageError, "control set"),
    (lambda: popek.run(42), UsageError, "not int"),
    (lambda: popek.diff(HELLO, "nope"), UsageError, "unknown monitor"),
    (lambda: popek.diff(HELLO, "native", direct_user=True), UsageError, "does not apply"),
    (lambda: popek.compare([]), UsageError, "at least one guest"),
    (lambda: popek.compare([HELLO], monitors=[]), UsageError, "at least one monitor"),
    (lambda: popek.compare([HELLO], profile="nope"), UsageError, "unknown profile"),
    (lambda: popek.report([]), UsageError, "at least one guest"),
    (lambda: popek.report([HELLO], monitors="vmware"), UsageError, "unknown monitor"),
    (lambda: popek.report([HELLO], monitors=[]), UsageError, "at least one monitor"),
    (lambda: popek.report([HELLO], max_instructions=-5), UsageError, "max_instructions"),
    (lambda: popek.theorem("nope"), UsageError, "unknown model"),
    (lambda: popek.theorem(isa="/nonexistent.isa"), BadInput, "cannot read"),
    (lambda: popek.assemble("/nonexistent.s"), BadInput, "no such file"),
    (lambda: popek.assemble("mov eax,\n"), SourceError, "<input>:1:"),
    (lambda: popek.assemble(str(ROOT / "README.md")), UsageError, "not an assembly source"),
    (lambda: popek.assemble(3), UsageError, "not int"),
])
def test_bad_input_is_a_typed_popek_error(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_missing_file_in_a_scan_is_an_entry_not_an_exception():
    # as `popek scan` reports it: the document carries the per-file error, and has_errors is set
    doc = popek.scan(["/nonexistent", VMDETECT])
    assert doc.has_errors and doc.files[0].error and doc.files[1].findings


def test_report_gives_the_page_the_command_writes(tmp_path, capsys):
    doc = popek.report(HELLO, "trap")
    page = doc.to_html()
    assert page.startswith("<!DOCTYPE html>") and "<table class=listing>" in page
    assert doc._repr_html_().startswith('<table class="popek">')
    out = tmp_path / "r.html"
    assert main(["report", HELLO, "--monitors", "trap", "-o", str(out)]) == 0
    strip = lambda text: re.sub(r"<td class=num>[0-9.]+</td></tr>", "", re.sub(r"base64,[^']+", "", text))
    assert strip(out.read_text()).count("<tr") == strip(page).count("<tr")
