"""Property-based differential testing: generated guests (popek.experiments.guestgen) under native and
under every monitor, compared by popek.experiments.differential.

Monitors are listed once, in ``EQUIVALENT`` (must agree with native on every guest: console, exit, visible
state and instruction count) or ``EXPECTED_TO_DIVERGE`` (with the reason; checked to diverge, as a strict
expected failure, never skipped). A monitor that is not built yet (``get_monitor`` raises "not built yet")
is skipped with that message, so ``bt`` plugs in by being written. Hypothesis runs derandomized (the same
guests on every run, so CI is stable); a failure prints the divergence report and the shrunk guest's
source: save it under tests/regressions/ (see its README), where every monitor runs it from then on.

About 2,100 generated guests in all: 1,500 per equivalent monitor, 300 for native determinism, 200 for
the per-kind coverage test, 60 for the fast builder against popek.asm, and those the mutant search draws.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import unicorn
from hypothesis import HealthCheck, Phase, find, given, note, settings
from hypothesis import strategies as st

import popek.monitors
from popek.asm import assemble_text
from popek.errors import UsageError
from popek.experiments import guestgen
from popek.experiments.differential import compare, differences, run
from popek.experiments.guestgen import BUDGET, EXIT_OK, FAULTS, LEAVES, GuestSpec, Options
from popek.monitors import get_monitor
from popek.monitors.emulate import Emulate

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = sorted((ROOT / "tests" / "regressions").glob("*.s"))

# A monitor joins by adding its name here (bt, once it is meant to pass), or to EXPECTED_TO_DIVERGE.
EQUIVALENT = ("emulate", "bt", "hvm")
EXPECTED_TO_DIVERGE = {
    "trap": "classic trap-and-emulate on IA-32 deprivileges the guest kernel, and its sensitive-unprivileged "
            "instructions (pushf/popf, sgdt, smsw, push cs, mov r,cs, lar, ...) run without trapping and see "
            "or change the real machine state (Robin & Irvine 2000)",
}

QUICK = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.large_base_example, HealthCheck.filter_too_much])
LINE = re.compile(r"eax=[0-9a-f]{8} ebx=[0-9a-f]{8} ecx=[0-9a-f]{8} edx=[0-9a-f]{8} esi=[0-9a-f]{8} "
                  r"edi=[0-9a-f]{8} ebp=[0-9a-f]{8} esp=[0-9a-f]{8} eflags=[0-9a-f]{8} sum=[0-9a-f]{8} "
                  r"ticks=[0-9a-f]{8} ints=[0-9a-f]{8} faults=[0-9a-f]{8} err=[0-9a-f]{8} far=[0-9a-f]{8} \n$")


def _availability(name: str) -> list:
    try:
        get_monitor(name)
    except UsageError as exc:                       # "monitor 'bt' is not built yet"
        return [pytest.mark.skip(reason=str(exc))]
    return []


def monitors(equivalent: bool = True, diverging: bool = True, strict: bool = True) -> list:
    """Monitor names as test parameters: expected divergence is an expected failure (``strict``: it must
    happen; only a failed comparison counts, a crash in the monitor is still an error), a monitor not built
    yet is skipped with get_monitor's message."""
    params = []
    if equivalent:
        params += [pytest.param(name, marks=_availability(name), id=name) for name in EQUIVALENT]
    if diverging:
        params += [pytest.param(name, id=name, marks=_availability(name)
                                + [pytest.mark.xfail(reason=reason, strict=strict, raises=AssertionError)])
                   for name, reason in EXPECTED_TO_DIVERGE.items()]
    return params


def check_valid(result) -> None:
    """What every generated guest must do natively: finish through the exit port with code 0 after
    printing its one line (a different end means a generator bug, not a monitor bug)."""
    assert (result.exit.reason, result.exit.code) == ("exit-port", EXIT_OK), result.render_text()
    assert LINE.search(result.console), result.console[-300:]


def check_agrees(spec: GuestSpec, monitor: str, label: str | None = None, **options) -> None:
    native = run(spec.guest(), "native", BUDGET)
    check_valid(native)
    other = run(spec.guest(), monitor, BUDGET, **options)
    diffs = differences(native, other)
    if diffs:
        note("\n".join(d.render("native", label or monitor) for d in diffs))
        note("shrunk guest (save it as tests/regressions/<name>.s):\n" + spec.text)
    assert not diffs


# --- the properties -----------------------------------------------------------------------------------------
# hvm's other control sets (the default, kvm, is in EQUIVALENT): shadow paging and AMD's exit codes must not
# change what the guest computes either.
HVM_VARIANTS = {"vtx-2005": {"controls": "vtx-2005"}, "svm": {"vendor": "svm"}}


@pytest.mark.parametrize("variant", list(HVM_VARIANTS))
@settings(QUICK, max_examples=300)
@given(spec=guestgen.guests())
def test_generated_guests_run_the_same_under_every_hvm_control_set(variant, spec):
    check_agrees(spec, "hvm", f"hvm {variant}", **HVM_VARIANTS[variant])


@pytest.mark.parametrize("monitor", monitors(diverging=False))
@settings(QUICK, max_examples=1500)
@given(spec=guestgen.guests())
def test_generated_guests_run_the_same_as_native(monitor, spec):
    check_agrees(spec, monitor)


@pytest.mark.parametrize("monitor", monitors(equivalent=False))
@settings(QUICK, max_examples=200, phases=[Phase.explicit, Phase.generate])      # the first divergence will do
@given(spec=guestgen.guests(kinds=tuple(k for k in LEAVES if k not in ("hlt", "junk"))))
def test_expected_divergence_is_seen(monitor, spec):
    check_agrees(spec, monitor)


@settings(QUICK, max_examples=300)
@given(spec=guestgen.guests())
def test_native_is_deterministic(spec):
    first, second = run(spec.guest(), "native", BUDGET).to_dict(), run(spec.guest(), "native", BUDGET).to_dict()
    first.pop("wall_seconds"), second.pop("wall_seconds")
    assert first == second


@pytest.mark.parametrize("kind", sorted(LEAVES))
@settings(QUICK, max_examples=4)
@given(data=st.data())
def test_every_item_kind_renders_runs_and_agrees(kind, data):
    # Options that let every kind render (an IDT, a timer for hlt, faults on).
    opts = guestgen.options(idt=True, timer=True, faults=True)
    spec = data.draw(guestgen.guests(max_items=6, min_items=1, opts=opts, kinds=(kind,), subs=False, control=False))
    assert kind in spec.kinds
    check_agrees(spec, "emulate")


@settings(QUICK, max_examples=60)
@given(spec=guestgen.guests())
def test_fast_builder_matches_the_assembler(spec):
    built, program = spec.build(), assemble_text(spec.text)
    assert (built.origin, built.entry) == (program.origin, program.entry)
    assert built.image == program.image


# --- the generator's faults are the ones intended, with the SDM's error codes --------------------------------
# (vector counted by the machine, error code in `err=`), under pm.inc's GDT and under the boot GDT.
FAULT_CODES = {
    ("div0", 0): ("#DE", 0), ("idiv0", 0): ("#DE", 0), ("ud2", 0): ("#UD", 0),
    ("bad_ds", 0): ("#GP", 0x1234), ("bad_ds", 1): ("#GP", 0x10), ("bad_ds", 2): ("#GP", 0x28),
    ("bad_ds", 3): ("#GP", 0xFFFC), ("bad_ss", 0): ("#GP", 0x08), ("bad_ss", 1): ("#GP", 0x20),
    ("bad_far", 0): ("#GP", 0x1230), ("rpl_far", 0): ("#GP", 0x08), ("monitor_write", 0): ("#GP", 0),
}


def test_fault_table_covers_every_fault_kind():
    assert {which for which, _ in FAULT_CODES} == set(FAULTS)


@pytest.mark.parametrize("own_gdt", [True, False], ids=["own-gdt", "boot-gdt"])
@pytest.mark.parametrize("which,choice", sorted(FAULT_CODES), ids=[f"{w}-{c}" for w, c in sorted(FAULT_CODES)])
def test_intended_faults_are_skipped_with_the_sdm_error_code(own_gdt, which, choice):
    spec = GuestSpec(Options(own_gdt, True, None, True), (0,) * 7, bytes(256), (("fault", which, choice),))
    r = run(spec.guest(), "native", BUDGET)
    check_valid(r)
    vector, code = FAULT_CODES[which, choice]
    assert r.events["exception"] == {vector: 1}
    assert f"faults=00000001 err={code:08x} " in r.console


# --- the harness finds and shrinks a real divergence ----------------------------------------------------------
class PopfIgnoresIF(Emulate):
    """A deliberately wrong monitor: popf never changes IF, as popf at CPL 3 behaves on real hardware."""

    name = "popf-ignores-if"

    def attach(self, machine):
        super().attach(machine)

        def before(uc, address, size, _):
            if self.decoder.names.get(address) == "popf":
                esp = machine.reg("esp")
                value = int.from_bytes(machine.memory.read(esp, 4), "little")
                value = (value & ~0x200) | (machine.reg("eflags") & 0x200)
                machine.memory.write(esp, value.to_bytes(4, "little"))

        machine.uc.hook_add(unicorn.UC_HOOK_CODE, before, None, 0, 0xFFFFFFFF)


def test_a_broken_monitor_is_caught_shrunk_and_located(monkeypatch):
    monkeypatch.setitem(popek.monitors.MONITORS, "popf-ignores-if", (__name__, "PopfIgnoresIF"))

    def diverges(spec):
        return compare(spec, "native", "popf-ignores-if", max_instructions=BUDGET) is not None

    # Hypothesis finds a divergent guest; guestgen.shrink (what `popek bench differential` uses) shrinks it.
    found = find(guestgen.guests(max_items=12, opts=guestgen.options(idt=True)), diverges, random=random.Random(0),
                 settings=settings(max_examples=1000, database=None, deadline=None, phases=[Phase.generate],
                                   suppress_health_check=list(HealthCheck)))
    small = guestgen.shrink(found, diverges)
    assert "popf" in small.kinds and len(small.body) + sum(len(b) for _, b in small.subs) <= 4
    assert not any(small.registers) and not any(small.scratch)
    d = compare(small, "native", "popf-ignores-if", locate=True)
    # the broken monitor rewrites the flags image on the stack, and guest RAM shows it too
    assert d.fields == ["console", "memory"] and "eflags=" in d.report()
    assert "popfd" in d.where
    assert d.source == small.text


class StrayStore(Emulate):
    """A deliberately wrong monitor: at the end it leaves one byte in a guest RAM page nothing else uses,
    so the guest's console, exit and registers are exactly native's."""

    name = "stray-store"

    def detach(self, machine):
        machine.memory.write(0x7F123, b"\x5a")
        super().detach(machine)


def test_a_difference_only_in_guest_ram_is_a_divergence(monkeypatch):
    monkeypatch.setitem(popek.monitors.MONITORS, "stray-store", (__name__, "StrayStore"))
    guest = str(ROOT / "samples" / "guests" / "hello.s")
    d = compare(guest, "native", "stray-store")
    assert d is not None and d.fields == ["memory"], d
    assert "guest RAM 0x0007f123..0x0007f123 (1 bytes)" in d.report()
    assert compare(guest, "native", "emulate") is None


# --- regressions: every saved guest under every monitor --------------------------------------------------------
def directives(path: Path) -> dict[str, list[str]]:
    """``; key: value`` lines at the top of a regression guest (see tests/regressions/README.md)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        m = re.match(r";\s*(expect|xfail|why|nondeterministic|same-under):\s*(.*\S)", line)
        if m:
            found.setdefault(m.group(1), []).append(m.group(2))
        elif line.strip() and not line.startswith(";"):
            break
    return found


def test_regression_folder_is_not_empty():
    assert REGRESSIONS


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_regression_guest_meets_its_expectations_natively(path, request):
    d = directives(path)
    assert d.get("why"), f"{path.name}: say why the guest is kept (; why: ...)"
    if d.get("xfail"):                  # a known machine bug: strict, so that a fix is noticed
        request.node.add_marker(pytest.mark.xfail(reason=d["xfail"][0], strict=True))
    r = run(str(path), "native", BUDGET)
    for expectation in d.get("expect", []):
        key, _, value = expectation.partition(" ")
        if key == "deterministic":
            again = run(str(path), "native", BUDGET)
            assert not differences(r, again) and r.events == again.events, f"{path.name}: two runs differ"
            continue
        actual = {"exit": f"{r.exit.reason} {r.exit.code}", "guest_instructions": str(r.guest_instructions)}.get(key)
        if key.startswith("state."):
            actual = f"{r.state[key[6:]]:#x}"
        assert actual == value.strip(), f"{path.name}: {key} is {actual}, expected {value.strip()}"


# Not every saved guest exercises what makes a monitor diverge: expected divergence is not strict here, and a
# guest that says `; same-under: MONITOR` (it runs nothing that monitor gets wrong) must agree with native.
def _regression_params() -> list:
    params = []
    for path in REGRESSIONS:
        same = " ".join(directives(path).get("same-under", [])).split()
        for param in monitors(strict=False):
            (monitor,) = param.values
            marks = [m for m in param.marks if not (monitor in same and m.name == "xfail")]
            params.append(pytest.param(path, monitor, marks=marks, id=f"{path.stem}-{monitor}"))
    return params


@pytest.mark.parametrize("path, monitor", _regression_params())
def test_regression_guest_runs_the_same_as_native(path, monitor, request):
    unstable = directives(path).get("nondeterministic")
    if unstable:                        # native disagrees with itself: a difference proves nothing
        request.node.add_marker(pytest.mark.xfail(reason=unstable[0], strict=False))
    d = compare(str(path), "native", monitor, max_instructions=BUDGET)
    assert d is None, d.report()
