"""No traceback on any file: a mutation fuzzer over real seeds (popek.scanner.fuzz), a few thousand inputs here;
`popek bench fuzz --examples 100000` runs the long version."""
from __future__ import annotations

from pathlib import Path

import pytest

from popek.scanner import fuzz

from test_loaders import build_elf, build_pe

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "bin" / "vmdetect"


def _check(result: fuzz.FuzzResult, inputs: int) -> None:
    assert result.inputs == inputs
    assert result.traceback_count == 0, fuzz.render(result, [], 1)
    # The mutations must reach both outcomes, or the fuzzer tests nothing.
    assert result.reports > inputs // 10 and sum(result.errors.values()) > inputs // 20


def test_small_seeds_2000_inputs(tmp_path):
    """popek's ELF32 sample, an ELF64 shared object from GNU ld, and PE32/PE32+ images whose ImageBase the
    mutations push toward 2^64."""
    seeds = [SAMPLE.read_bytes(), Path(build_elf(tmp_path, 64, "so")).read_bytes(), build_pe(), build_pe(plus=True)]
    _check(fuzz.run(seeds, 2000, seed=7), 2000)


def test_real_pe_seeds_400_inputs():
    """The PE32 and PE32+ launchers pip ships (MSVC-built), when pip is installed."""
    seeds = [p for p in fuzz.default_seeds() if p.endswith(".exe")]
    if not seeds:
        pytest.skip("pip's distlib launchers (t32.exe, t64.exe) not found")
    _check(fuzz.run([Path(p).read_bytes() for p in seeds], 400, seed=7), 400)


def test_an_input_can_be_rebuilt_alone():
    seeds = [SAMPLE.read_bytes(), build_pe()]
    assert fuzz.rebuild(seeds, 5, seed=3) == fuzz.rebuild(seeds, 5, seed=3) != fuzz.rebuild(seeds, 7, seed=3)
    assert fuzz.strategy_of(3 * 2 + 1, 2) == "recursive" and fuzz.strategy_of(1, 2) == "linear"


def test_a_traceback_is_counted_where_it_was_raised(monkeypatch):
    # The fuzzer itself must see a bug: make the loader fail the way the old pyelftools seek did.
    import popek.loaders as loaders

    def broken(data, path):
        raise OverflowError("Python int too large to convert to C ssize_t")
    monkeypatch.setattr(loaders, "load_data", broken)
    result = fuzz.FuzzResult()
    from popek.isa import bundled_classifier
    fuzz.run_one(SAMPLE.read_bytes(), bundled_classifier(), "linear", result, 0)
    assert result.traceback_count == 1 and next(iter(result.tracebacks)).startswith("OverflowError at test_scan_fuzz.py:")
