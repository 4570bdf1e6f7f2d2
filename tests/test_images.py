"""popek bench images: random 4 KiB images, bare or behind the resuming prologue, native against a monitor;
every image gets exactly one outcome, a run on the budget is never counted equal, and a monitor that
leaves a trace in guest RAM is caught."""
from __future__ import annotations

import popek.monitors
from popek.experiments import images
from popek.experiments.differential import run
from popek.monitors.emulate import Emulate


def test_the_prologue_resumes_faulting_images_until_its_fault_limit():
    # image 25 of seed 0 faults RESUMES times, resumed each time by the prologue's handler (found by a survey)
    result = run(images.guest(0, 25), "native", images.BUDGET)
    assert (result.exit.reason, result.exit.code) == ("exit-port", 0)
    # an even image is bare: the first fault of image 0 ends it (the boot IDT has no gates)
    assert run(images.guest(0, 0), "native", images.BUDGET).exit.reason == "triple-fault"
    assert images.image(0, 3)[:len(images._prologue())] == images._prologue()
    assert images.image(0, 3) != images.image(1, 3) and len(images.image(0, 2)) == images.IMAGE_SIZE


def test_every_image_gets_one_outcome_and_the_budget_is_undecided():
    report = images.bench("emulate", 10, jobs=2, budget=3000, locate_first=1)
    assert report.examples == 10 == sum(report.outcomes.values()) == sum(report.ends.values())
    # natively some of these ten reach the budget: they are undecided, never equal
    budget_runs = sum(n for (reason, _), n in report.ends.items() if reason == "budget")
    assert budget_runs and report.outcomes.get(images.AT_BUDGET, 0) == budget_runs
    assert report.outcomes.get(images.DIVERGENT, 0) == 0, report.render()
    text = report.render()
    assert "native vs emulate, seed 0, 10 random" in text and "equal up to the budget" in text


class ScribblesOnExit(Emulate):
    """A deliberately wrong monitor: it leaves one byte of guest RAM changed when the run ends."""

    name = "scribbles"

    def detach(self, machine):
        machine.memory.write(0x7F321, b"\xa5")
        super().detach(machine)


def test_a_monitor_that_changes_only_ram_diverges_and_its_first_image_is_saved(monkeypatch, tmp_path):
    monkeypatch.setitem(popek.monitors.MONITORS, "scribbles", (__name__, "ScribblesOnExit"))
    report = images.bench("scribbles", 4, jobs=1, budget=2000, locate_first=1, save=str(tmp_path / "out"))
    assert report.outcomes == {images.DIVERGENT: 4}
    assert list(report.signatures) == [("memory",)] and report.first[("memory",)] == 0
    (k, d), = report.located
    assert k == 0 and "0x0007f321" in d.report()
    saved = tmp_path / "out" / images.guest(0, 0).name
    assert saved.read_bytes() == images.image(0, 0)


class DeclinesEverything(Emulate):
    """A monitor that ends every run `unsupported` at once, naming what it does not model."""

    name = "declines"

    def attach(self, machine):
        super().attach(machine)
        from popek.machine.result import UNSUPPORTED
        machine.finish(UNSUPPORTED, None, "declines: everything is not modelled")


def test_the_first_image_a_monitor_declines_is_named_and_saved(monkeypatch, tmp_path):
    monkeypatch.setitem(popek.monitors.MONITORS, "declines", (__name__, "DeclinesEverything"))
    report = images.bench("declines", 3, jobs=1, budget=2000, save=str(tmp_path / "out"))
    assert report.outcomes == {images.NOT_MODELLED: 3}
    why = "declines: everything is not modelled"
    assert report.first_declined == {why: 0}
    assert f"3  not modelled: {why}  (first: image 0)" in report.render()
    assert (tmp_path / "out" / images.guest(0, 0).name).read_bytes() == images.image(0, 0)
