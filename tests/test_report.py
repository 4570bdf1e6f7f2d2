"""``popek report``: the traced runs behind it change nothing, every mark comes from what a monitor did, the page
is self-contained, and a real browser (headless Chromium, Debian's package) renders it without script errors."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import popek
from popek.cli import main
from popek.experiments import report
from popek.experiments.attribution import traced_run
from popek.monitors import MONITORS, platform_defines

ROOT = Path(__file__).resolve().parent.parent
STORE = str(ROOT / "samples" / "guests" / "store_tables.s")


def _timeless(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "wall_seconds"}


@pytest.mark.parametrize("monitor", list(MONITORS))
def test_a_traced_run_is_the_same_run(monitor):
    guest = popek.assemble(STORE, defines=platform_defines(monitor) or None)
    traced, _ = traced_run(guest, monitor)
    assert _timeless(traced.to_dict()) == _timeless(popek.run(guest, monitor).to_dict())


@pytest.fixture(scope="module")
def document():
    return report.build([STORE])


def _marks(doc, monitor: str) -> dict[int, list[tuple[str, str]]]:
    b = next(b for b in doc.guests[0].builds if monitor in b.monitors)
    native = b.traces.get("native")
    leaks = {}
    if native is not None and monitor != "native":
        from popek.experiments.divergence import blame
        for x in blame(native.observations, b.traces[monitor].observations):
            leaks.setdefault(int(x["address"], 16), []).append(x)
    return report.marks_for(b, monitor, leaks)


def _at(doc, text: str) -> int:
    """The address of the first listed instruction whose text starts with ``text`` (native build)."""
    rows = report.listing(doc.guests[0].builds[0])
    return next(i.address for kind, i in rows if kind == "insn" and i.text.startswith(text))


def test_each_monitor_marks_what_it_did(document):
    lgdt, sgdt = _at(document, "lgdt"), _at(document, "sgdt")
    native = _marks(document, "native")
    assert {m for ms in native.values() for m, _ in ms} == {"ran"}
    trap = _marks(document, "trap")
    assert ("trap", "lgdt") in trap[lgdt]
    assert any(m == "leaked" and "GDTR base=0x02000018" in label for m, label in trap[sgdt])
    bt = _marks(document, "bt")
    assert bt[lgdt] == [("callout", "lgdt")] and bt[sgdt] == [("callout", "sgdt")]
    assert {m for ms in bt.values() for m, _ in ms} <= {"ident", "rewritten", "callout"}
    hvm = _marks(document, "hvm")
    assert hvm[sgdt] == [("ran", "")]                       # sgdt reads the guest's own GDTR in non-root mode
    assert any(m == "exit" and "IO_INSTRUCTION" in label for ms in hvm.values() for m, label in ms)
    emulate = _marks(document, "emulate")
    assert {m for ms in emulate.values() for m, _ in ms} == {"interpreted"}
    pv = _marks(document, "pv")
    assert any(m == "hypercall" and "set_gdt" in label for ms in pv.values() for m, label in ms)
    assert not any(m == "leaked" for ms in pv.values() for m, _ in ms)   # no native run of the PV build


def test_pv_runs_its_own_build_and_the_page_says_it_cannot_pair_it(document):
    labels = [b.label for b in document.guests[0].builds]
    assert labels[:2] == ["native build", "-D PV build"]           # then one build per other platform (SUN4V)
    assert document.guests[0].builds[1].monitors == ["pv"]
    assert all(len(build.monitors) == 1 for build in document.guests[0].builds[1:])
    page = document.to_html()
    assert "Listing, -D PV build" in page and "no native run of this build" in page
    assert "bt records how each instruction was translated" in page


def test_the_page_is_self_contained(document):
    page = document.to_html()
    assert page.startswith("<!DOCTYPE html>")
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]?([^'" >]+)""", page)
    assert refs and all(r.startswith("data:") for r in refs), refs
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert '<table class=comparison>' in page and '<table class=listing>' in page
    assert "sgdt [0x10078c]" in page                        # the listing
    assert "Divergences" in page and "GDTR base=0x02000018" in page


def test_command_writes_the_page_and_bad_input_is_one_line(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", STORE, "--monitors", "trap,bt", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and out.read_text().count("<table class=listing>") == 1
    for bad in (["report", STORE, "--monitors", "vmware", "-o", str(out)],
                ["report", STORE, "--monitors", ",", "-o", str(out)],
                ["report", "/nonexistent.s", "-o", str(out)],
                ["report", STORE, "-o", str(tmp_path / "no" / "such" / "dir.html")],
                ["report", STORE, "--profile", "nope", "-o", str(out)]):
        capsys.readouterr()
        assert main(bad) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert main(["report", STORE]) == 2                    # -o is required (argparse's usage error)


# --- a real browser -------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian's "
                                    "chromium package; .ci/run installs it where the mirror has it)")


def _chromium(*args, page: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=180)


def _script_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]


@needs_chromium
def test_the_script_error_check_can_fail(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>throw new Error('popek-test-error')</script></body></html>")
    assert any("popek-test-error" in line for line in _script_errors(_chromium("--dump-dom", page=bad).stderr))


@needs_chromium
def test_chromium_renders_the_report(tmp_path, document):
    page = tmp_path / "report.html"
    page.write_text(document.to_html(), encoding="utf-8")
    done = _chromium("--dump-dom", page=page)
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert not _script_errors(done.stderr), _script_errors(done.stderr)
    assert 'data-ready="yes"' in dom                       # the inline script ran to its end
    assert '<table class="comparison">' in dom and '<table class="listing">' in dom
    assert dom.count('<tr class="insn">') >= 100
    assert "trap lgdt" in dom and "callout sgdt" in dom and "exit CR_ACCESS" in dom and "hypercall set_gdt" in dom
    shot = tmp_path / "report.png"
    done = _chromium("--window-size=1400,2000", f"--screenshot={shot}", page=page)
    assert shot.is_file() and shot.stat().st_size > 50_000, done.stderr[-2000:]
