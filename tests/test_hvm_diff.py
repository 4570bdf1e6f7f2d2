"""popek diff GUEST --monitor hvm names the cpuid whose answer differs: its address, what it was asked (leaf,
subleaf), which output registers differ and both answers, in text and in JSON; and bench differential takes
hvm's --vendor/--controls."""
from __future__ import annotations

import json

import pytest

from popek.cli import main
from popek.experiments.differential import fuzz
from popek.experiments.divergence import diff
from popek.machine.cpuid import bare, unicorn_cpuid

# The exit contract (docs/machine.md): a byte written to port 0xF4 ends the run with that exit code.
CPUID_GUEST = """        .org 0x00100000
_start:
        mov eax, {leaf}
        mov ecx, {subleaf}
        cpuid
        {pick}
        mov dx, 0xF4
        out dx, al
        hlt
"""
CPUID_AT = 0x100000 + 5 + 5          # after mov eax, imm32 and mov ecx, imm32


def _guest(tmp_path, leaf: int, pick: str, subleaf: int = 0) -> str:
    path = tmp_path / f"cpuid-{leaf:x}.s"
    path.write_text(CPUID_GUEST.format(leaf=leaf, subleaf=subleaf, pick=pick))
    return str(path)


@pytest.mark.parametrize("options", [{}, {"controls": "vtx-2005"}, {"vendor": "svm"}])
def test_the_hypervisor_leaf_is_named_with_leaf_registers_and_both_answers(tmp_path, options):
    report = diff(_guest(tmp_path, 0x40000000, "mov eax, ebx", subleaf=3), "hvm", options=options)
    assert report.status == "diverges"
    (b,) = [b for b in report.blamed if b["name"] == "cpuid"]
    assert b["address"] == f"{CPUID_AT:#x}"
    assert b["asked"] == {"leaf": "0x40000000", "subleaf": "0x3"}
    # KVM's signature 'KVMKVMKVM' in EBX, ECX, EDX, EAX the highest hypervisor leaf; the bare CPU has zeros
    assert b["fields"] == {"eax": {"native": "0x00000000", "monitored": "0x40000001"},
                           "ebx": {"native": "0x00000000", "monitored": "0x4b4d564b"},
                           "ecx": {"native": "0x00000000", "monitored": "0x564b4d56"},
                           "edx": {"native": "0x00000000", "monitored": "0x0000004d"}}
    text = report.render_text()
    assert (f"cpuid at {CPUID_AT:#x} (cpuid), leaf 0x40000000, subleaf 0x3: eax, ebx, ecx, edx differ: hvm answered "
            "eax 0x40000001, ebx 0x4b4d564b") in text
    assert "no observed instruction" not in text and "documented difference" in text


def test_only_the_differing_output_register_is_named(tmp_path):
    """A changed signature of 4 characters differs in EBX alone (and EAX, the highest leaf)."""
    report = diff(_guest(tmp_path, 0x40000000, "mov eax, ebx"), "hvm", options={"control": ("cpuid-vendor=ABCD",)})
    (b,) = report.blamed
    assert set(b["fields"]) == {"eax", "ebx"} and b["fields"]["ebx"]["monitored"] == "0x44434241"


def test_the_json_document_carries_the_named_cpuid(tmp_path, capsys):
    assert main(["diff", _guest(tmp_path, 0x40000000, "mov eax, ebx"), "--monitor", "hvm", "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    (b,) = doc["instructions"]
    assert (b["name"], b["address"], b["asked"]["leaf"]) == ("cpuid", f"{CPUID_AT:#x}", "0x40000000")
    assert b["fields"]["ebx"] == {"native": "0x00000000", "monitored": "0x4b4d564b"}


def test_leaf_1_hypervisor_bit_is_the_difference_hvm_makes_on_purpose(tmp_path):
    """The reviewer's guest (mov eax,1; cpuid; ecx >> 31 as the exit code): the bare machine reads 0 there, as
    the hardware (Unicorn's model says 1, the machine clears it); hvm sets it and diff names that cpuid; with
    cpuid-hypervisor-bit=off hvm answers as the bare machine."""
    assert bare(1, 0)[2] >> 31 == 0 and unicorn_cpuid(1, 0)[2] >> 31 == 1
    path = _guest(tmp_path, 1, "mov eax, ecx\n        shr eax, 31")
    for options in ({}, {"vendor": "svm"}):
        report = diff(path, "hvm", options=options)
        assert not report.equivalent and report.other["exit"]["code"] == 1 and report.native["exit"]["code"] == 0
        (b,) = report.blamed
        assert b["name"] == "cpuid" and "ecx" in b["fields"]
    report = diff(path, "hvm", options={"control": ("cpuid-hypervisor-bit=off",)})
    assert report.equivalent and report.blamed == [] and report.other["exit"]["code"] == 0


def test_cpuid_is_not_named_under_a_monitor_that_lets_it_run(tmp_path):
    report = diff(_guest(tmp_path, 0x40000000, "mov eax, ebx"), "trap")
    assert report.equivalent and report.blamed == []


def test_bench_differential_takes_hvm_controls_and_vendor():
    report = fuzz("hvm", 3, jobs=1, shrink_first=0, options={"controls": "vtx-2005", "vendor": "svm"})
    assert (report.examples, report.divergent) == (3, 0)
    assert "native vs hvm --controls vtx-2005 --vendor svm" in report.render()
