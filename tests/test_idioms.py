"""VM-detection idioms: the samples in samples/idioms/ (table in its README) and the data-flow's robustness."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.decode import sweep
from popek.isa import bundled_classifier
from popek.loaders import load
from popek.scanner import scan_image
from popek.scanner.idioms import IDIOMS, TRIGGERS, find_idioms

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "idioms"
AS, OBJCOPY = shutil.which("as") or "/usr/bin/as", shutil.which("objcopy") or "/usr/bin/objcopy"
HAVE_BINUTILS = Path(AS).exists() and Path(OBJCOPY).exists()
needs_binutils = pytest.mark.skipif(not HAVE_BINUTILS, reason="GNU as/objcopy not installed (apt-get install binutils)")

# The real classifier lives elsewhere; sites only need the canonical names the idioms trigger on.
CANONICAL = {"sidt": "sidt", "sgdt": "sgdt", "sldt": "sldt", "str": "str", "smsw": "smsw", "in": "in",
             "cpuid": "cpuid", "rdtsc": "rdtsc", "out": "out"}
ROW = re.compile(r"^\| (\S+\.s) \| (16|32|64) \| ([^|]+?) \|")


def expectations() -> list[tuple[str, int, str | None, str | None]]:
    """(file, mode, site canonical name, idiom) per README row; None, None for a negative."""
    rows = []
    for line in (SAMPLES / "README.md").read_text().splitlines():
        m = ROW.match(line)
        if m:
            name, mode, expected = m.group(1), int(m.group(2)), m.group(3).strip()
            site, idiom = (None, None) if expected == "none" else [s.strip() for s in expected.split(":")]
            rows.append((name, mode, site, idiom))
    return rows


EXPECTED = expectations()


def assemble(path: Path, mode: int, tmp: Path) -> bytes:
    obj, raw = tmp / (path.stem + ".o"), tmp / (path.stem + ".bin")
    subprocess.run([AS, f"--{mode}", str(path), "-o", str(obj)], check=True, capture_output=True)
    subprocess.run([OBJCOPY, "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True, capture_output=True)
    return raw.read_bytes()


def sites_of(code: bytes, base: int, mode: int) -> list[tuple[int, str]]:
    return [(a, CANONICAL[mn]) for a, _size, mn, _ops in sweep(code, base, mode) if mn in CANONICAL]


def test_readme_lists_every_sample_and_every_idiom():
    listed = {name for name, *_ in EXPECTED}
    assert listed == {p.name for p in SAMPLES.glob("*.s")}
    # rdtsc-delta is tested on C code compiled by mingw (below), where its two reads are two sites.
    # These are tested on C code compiled by mingw (below): rdtsc-delta's two reads are two sites, the others
    # need a compiler's or a caller's code around them.
    compiled = {"rdtsc-delta", "vmware-backdoor-hb", "xen-cpuid-signature"}
    assert {idiom for *_, idiom in EXPECTED if idiom} | compiled == {i.name for i in IDIOMS}
    assert {mode for _, mode, site, _ in EXPECTED if site in ("sidt", "cpuid")} >= {32, 64}


@needs_binutils
@pytest.mark.parametrize("base", [0x401000, 0x7C00])
@pytest.mark.parametrize("name,mode,site,idiom", EXPECTED, ids=[row[0] for row in EXPECTED])
def test_sample(name, mode, site, idiom, base, tmp_path):
    code = assemble(SAMPLES / name, mode, tmp_path)
    sites = sites_of(code, base, mode)
    assert sites, f"{name}: no site found"
    found = find_idioms(code, base, mode, sites)
    if idiom is None:
        assert found == {}, f"{name}: negative sample flagged: {found}"
        return
    at = [a for a, canonical in sites if canonical == site]
    assert len(at) == 1, f"{name}: expected one {site} site, found {at}"
    assert set(found) == {at[0]}
    got, why = found[at[0]]
    assert got == idiom
    assert why and "\n" not in why


def test_sites_that_trigger_nothing_are_ignored():
    # hlt is a site but no row triggers on it; unknown names are not an error either.
    code = bytes.fromhex("f4" "0f31")      # hlt; rdtsc
    assert find_idioms(code, 0x1000, 32, [(0x1000, "hlt"), (0x1001, "no-such-name")]) == {}
    assert "hlt" not in TRIGGERS


def test_a_lone_rdtsc_or_two_unsubtracted_are_no_delta():
    assert find_idioms(bytes.fromhex("0f31" "0f31"), 0x1000, 32, [(0x1000, "rdtsc"), (0x1002, "rdtsc")]) == {}
    # rdtsc; mov esi, eax; cpuid; rdtsc; sub eax, esi: the first read is the timed one
    code = bytes.fromhex("0f31" "89c6" "0fa2" "0f31" "29f0")
    assert find_idioms(code, 0x1000, 32, [(0x1000, "rdtsc"), (0x1006, "rdtsc")]) == {0x1000: (
        "rdtsc-delta", next(i.why for i in IDIOMS if i.name == "rdtsc-delta"))}
    # the same, but a ret between the reads: another path
    code = bytes.fromhex("0f31" "89c6" "c3" "0f31" "29f0")
    assert find_idioms(code, 0x1000, 32, [(0x1000, "rdtsc"), (0x1005, "rdtsc")]) == {}


def test_site_outside_region_is_a_precondition():
    with pytest.raises(AssertionError):
        find_idioms(b"\x0f\xa2", 0x1000, 32, [(0x2000, "cpuid")])


def test_magic_set_up_by_push_pop_and_stack_slots():
    # push 0x564d5868; pop eax; mov edx, 0x5658; in eax, dx   (set-up through the stack)
    code = bytes.fromhex("6868584d56" "58" "ba58560000" "ed")
    assert find_idioms(code, 0, 32, [(11, "in")])[11][0] == "vmware-backdoor"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(code=st.binary(min_size=1, max_size=96), mode=st.sampled_from([16, 32, 64]),
       names=st.lists(st.sampled_from(sorted(TRIGGERS)), min_size=1, max_size=4))
def test_never_raises_on_arbitrary_bytes(code, mode, names):
    # Every decoded instruction boundary becomes a site with an arbitrary trigger name: whatever the operands
    # look like (x87, SSE, far pointers, segment registers), the data-flow must shrug, not crash.
    addresses = [a for a, *_ in sweep(code, 0x1000, mode)]
    sites = [(a, names[i % len(names)]) for i, a in enumerate(addresses)]
    result = find_idioms(code, 0x1000, mode, sites)
    assert set(result) <= set(addresses)


# ---------------------------------------------------------------------- compiled by mingw (rdtsc-delta)

MINGW = shutil.which("i686-w64-mingw32-gcc")
C_FIXTURES = Path(__file__).parent / "fixtures" / "c"


@pytest.mark.skipif(not MINGW, reason="gcc-mingw-w64-i686 not installed")
@pytest.mark.parametrize("opt", ["-O0", "-O2"])
@pytest.mark.parametrize("source, expected", [
    ("rdtsc-delta.c", {"rdtsc-delta"}),          # __rdtsc() around __cpuid, delta compared
    ("neg-rdtsc-logged.c", set()),               # the same reads, printed and never subtracted
])
def test_rdtsc_delta_in_mingw_code(tmp_path, opt, source, expected):
    exe = tmp_path / "t.exe"
    subprocess.run([MINGW, opt, "-o", str(exe), str(C_FIXTURES / source)], check=True, capture_output=True)
    report = scan_image(load(str(exe)), bundled_classifier())
    rdtsc = [f for f in report.findings if f.name == "rdtsc"]
    assert len(rdtsc) == 2
    assert {f.idiom for f in rdtsc} - {None} == expected


@pytest.mark.skipif(not MINGW, reason="gcc-mingw-w64-i686 not installed")
def test_rdtsc_delta_through_an_inline_asm_helper_at_O2(tmp_path):
    exe = tmp_path / "t.exe"
    subprocess.run([MINGW, "-O2", "-o", str(exe), str(C_FIXTURES / "rdtsc-delta-asm.c")], check=True,
                   capture_output=True)
    report = scan_image(load(str(exe)), bundled_classifier())
    assert [f.idiom for f in report.findings if f.name == "rdtsc"][0] == "rdtsc-delta"


@pytest.mark.skipif(not MINGW, reason="gcc-mingw-w64-i686 not installed")
@pytest.mark.parametrize("opt", ["-O0", "-O2"])
@pytest.mark.parametrize("source, expected", [
    ("cpuid-hv-bit-helper.c", ["cpuid-hypervisor-bit"]),   # return (ecx >> 31) & 1: shr 31 in the helper
    ("cpuid-hv-bit-sign.c", ["cpuid-hypervisor-bit"]),     # (int)ecx < 0: test ecx, ecx; js
    ("neg-cpuid-sse3.c", [None, None]),                    # ECX bit 0 of leaf 1; ECX bit 31 of leaf 0
])
def test_cpuid_hypervisor_bit_in_mingw_code(tmp_path, opt, source, expected):
    exe = tmp_path / "t.exe"
    subprocess.run([MINGW, opt, "-o", str(exe), str(C_FIXTURES / source)], check=True, capture_output=True)
    report = scan_image(load(str(exe)), bundled_classifier())
    assert [f.idiom for f in report.findings if f.name == "cpuid"] == expected


# ------------------------------------------- compiled by mingw: pointers, compiler arithmetic, callers, signatures

@pytest.mark.skipif(not MINGW, reason="gcc-mingw-w64-i686 not installed (apt-get install gcc-mingw-w64-i686)")
@pytest.mark.parametrize("opt", ["-O0", "-O2"])
@pytest.mark.parametrize("source, site, expected", [
    # the descriptor read back through a pointer (-O0: lea eax, [ebp-10]; add eax, 2; mov [ebp-4], eax; ...)
    ("sidt-base-pointer.c", "sidt", ["redpill"]),
    ("neg-sidt-base-logged.c", "sidt", [None]),
    ("sldt-sentinel-pointer.c", "sldt", ["sldt-sentinel"]),
    ("neg-sldt-logged.c", "sldt", [None]),
    # !((msw >> 4) & 1) -- -O2: shr eax, 4; xor eax, 1; and eax, 1
    ("smsw-et-bit.c", "smsw", ["smsw-check"]),
    ("neg-smsw-logged.c", "smsw", [None]),
    # open-vm-tools' shape: the caller fills a register block, a helper loads EAX and DX from it and runs IN
    ("vmware-backdoor-caller.c", "in", ["vmware-backdoor"]),
    ("neg-backdoor-helper-other-port.c", "in", [None]),
    ("vmware-backdoor-hb.c", "ins", ["vmware-backdoor-hb"]),
    ("neg-rep-insb-disk.c", "ins", [None]),
    ("xen-cpuid-signature.c", "cpuid", ["xen-cpuid-signature"]),
    ("neg-xen-signature-without-ud2.c", "cpuid", [None]),
])
def test_idioms_in_mingw_code(tmp_path, opt, source, site, expected):
    exe = tmp_path / "t.exe"
    subprocess.run([MINGW, opt, "-o", str(exe), str(C_FIXTURES / source)], check=True, capture_output=True)
    report = scan_image(load(str(exe)), bundled_classifier())
    assert [f.idiom for f in report.findings if f.name == site] == expected
    if source == "vmware-backdoor-caller.c":
        why = next(f.idiom_why for f in report.findings if f.name == "in")
        assert re.search(r"\(set up by the caller at 0x[0-9a-f]+\)$", why)
    if source.startswith("xen"):
        # The signature's "xen" bytes decode as js; outsb: that outsb is not an instruction, so not a finding.
        assert [f.name for f in report.findings if f.name == "outs"] == []
    if source == "neg-xen-signature-without-ud2.c":
        assert [f.name for f in report.findings if f.name == "outs"] == ["outs"]


def test_a_pointer_in_a_stack_slot_is_followed():
    # lea eax, [ebp-8]; mov [ebp-4], eax; sldt [ebp-8]... as bytes: mov dword [ebp-8], 0xdeadbeef; sldt [ebp-8];
    # lea eax, [ebp-8]; mov [ebp-4], eax; mov eax, [ebp-4]; mov eax, [eax]; cmp eax, 0xdead0000
    code = bytes.fromhex("c745f8efbeadde" "0f0045f8" "8d45f8" "8945fc" "8b45fc" "8b00" "3d0000adde")
    assert find_idioms(code, 0, 32, [(7, "sldt")])[7][0] == "sldt-sentinel"
    # ebp changes between the store and the read back: [ebp-8] is another cell now, and nothing is found
    code = bytes.fromhex("c745f8efbeadde" "0f0045f8" "8d45f8" "bd00100000" "8b45f8" "3d0000adde")
    assert find_idioms(code, 0, 32, [(7, "sldt")]) == {}                      # mov ebp, 0x1000
