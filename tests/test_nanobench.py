"""The nanobenchmarks (samples/nanobench) and `popek bench nano` / `popek bench hvm`."""
from __future__ import annotations

from pathlib import Path

import pytest

from popek.cli import main
from popek.cost import load as load_profile
from popek.experiments import nanobench
from popek.monitors import MONITORS

PROFILES = Path(__file__).resolve().parent.parent / "popek" / "cost" / "profiles"


def _native(bench: str, n: int = 50):
    return nanobench.measure(bench, nanobench.Column("native", "native"), n, load_profile("p4-2006"))


# What one iteration adds natively, op build over EMPTY build: guest instructions and guest events.
ONE_OPERATION = {
    "syscall": (2, {"software-interrupt": {"int 0x80": 1}}),          # the int and the handler's iretd
    "in": (1, {"io": {"com1": 1}}),
    "crwr": (1, {}),
    "callret": (2, {}),                                               # the call and the ret
    "pgfault": (4, {"exception": {"#PF": 1}}),                        # handler: store, add, iretd; the read again
    "divzero": (2, {"exception": {"#DE": 1}}),                        # handler: add, iretd
    "ptemod": (1, {}),                                                # the store alone
}


@pytest.mark.parametrize("bench", nanobench.ORDER)
def test_each_nanobenchmark_is_one_operation_over_its_empty_twin(bench):
    m = _native(bench)
    assert m.missing is None
    instructions, events = ONE_OPERATION[bench]
    assert m.instructions == instructions
    assert m.events == events


def test_every_nanobenchmark_is_known():
    assert nanobench.benches() == list(nanobench.ORDER)
    assert set(nanobench.PAPER) == set(nanobench.ORDERINGS) == set(nanobench.ORDER)


def test_the_columns_come_from_the_registry(monkeypatch):
    labels = [c.label for c in nanobench.columns()]
    for name in MONITORS:
        assert name in labels or any(label.startswith(name + ":") for label in labels)
    assert "hvm:kvm" in labels and "hvm:vtx-2005" in labels
    # A monitor registered later (as sun4v will be) gets its column with no change to the benchmark.
    monkeypatch.setitem(MONITORS, "native-again", ("popek.monitors.native", "Native"))
    report = nanobench.nano(20, only=("callret",))
    header = report.render().splitlines()[1]
    for c in nanobench.columns():
        assert c.label in header
    assert report.table[("callret", "native-again")].cycles == report.table[("callret", "native")].cycles


def test_bench_nano_prints_every_column_and_judges_the_orderings(capsys):
    assert main(["bench", "nano", "-n", "20", "--bench", "divzero", "--bench", "ptemod"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1]
    for c in nanobench.columns():
        assert c.label in header
    assert "n/a[1]" in out and "no PV build" in out                 # ptemod has no platform-layer build
    assert "divzero  hardware < software      yes" in out
    assert "reproduced" in out and "of 4 orderings" in out


def test_the_orderings_are_computed_from_the_run(tmp_path):
    on_p4 = nanobench.nano(20, only=("pgfault",))
    verdicts = {(o.left, o.right): o.reproduced for o in nanobench.orderings(on_p4.table)}
    assert verdicts[("software", "hardware")] is True
    # The same run on a profile where a VM exit is free and the translator's callouts are dear: the
    # hardware VMM's page fault is now cheaper than binary translation's, and the line says so.
    text = (PROFILES / "p4-2006.toml").read_text()
    text = text.replace('[exit]\neach = { cycles = 2400,', '[exit]\neach = { cycles = 0,')
    text = text.replace('[callout]\n"*" = { cycles = 60,', '[callout]\n"*" = { cycles = 90000,')
    cheap_exits = tmp_path / "cheap-exits.toml"
    cheap_exits.write_text(text)
    report = nanobench.nano(20, str(cheap_exits), only=("pgfault",))
    judged = {(o.left, o.right): o for o in nanobench.orderings(report.table)}
    assert judged[("software", "hardware")].reproduced is False
    assert judged[("software", "hardware")].model == ">"
    assert "pgfault  software < hardware      NO" in report.render()


def test_relation():
    assert nanobench.relation(889, 1014) == "~"        # the paper's "near native"
    assert nanobench.relation(2, 4) == "~"             # a few cycles are noise
    assert nanobench.relation(11, 51) == "<"
    assert nanobench.relation(12733, 391) == ">"


def test_a_fitted_price_is_marked():
    profile = load_profile("p4-2006")
    bt = nanobench.Column("bt", "bt")
    assert nanobench.measure("divzero", bt, 20, profile).fitted       # reflect is priced from divzero itself
    assert not nanobench.measure("syscall", bt, 20, profile).fitted


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "--iterations must be at least 1"),
    (["--bench", "nope"], "unknown nanobenchmark 'nope'"),
    (["--profile", "nope"], "unknown profile 'nope'"),
])
def test_bench_nano_usage_errors(args, message, capsys):
    assert main(["bench", "nano", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bench_hvm(capsys):
    assert main(["bench", "hvm", "-n", "20"]) == 0
    out = capsys.readouterr().out
    assert "paging " in out and "EXCEPTION_NMI 1" in out              # the paging sample's true fault
    pgfault = [line for line in out.splitlines() if line.startswith("  pgfault  vtx-2005")]
    assert pgfault and "EXCEPTION_NMI 1" in pgfault[0]
    for bench in ("in", "pgfault", "ptemod", "syscall"):
        assert any(line.startswith(f"  {bench:8} paper: hardware") for line in out.splitlines())
    assert "the model reproduces" in out
    assert main(["bench", "hvm", "-n", "0"]) == 2


def test_a_monitor_that_breaks_gets_its_reason_in_its_cell(monkeypatch):
    monkeypatch.setitem(MONITORS, "broken", ("popek.monitors.native", "NoSuchMonitor"))
    report = nanobench.nano(10, only=("callret",))
    cell = report.table[("callret", "broken")]
    assert cell.cycles is None and "broken failed: AttributeError" in cell.missing
    assert "n/a[1]" in report.render() and report.table[("callret", "native")].cycles is not None
