"""hvm: exits counted exactly per control set (guests written from the exit table in docs/hvm.md), the
kvm / vtx-2005 / svm differences, equivalence with native, and bad options."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from popek.errors import BadInput, UsageError
from popek.isa.language import bundled, parse
from popek.monitors import run_guest
from popek.monitors.hvm import controls as control_sets
from popek.monitors.hvm.cpuid import bare

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "samples" / "guests").glob("*.s")) + sorted((ROOT / "samples" / "nanobench").glob("*.s"))
VARIANTS = {"kvm": {}, "vtx-2005": {"controls": "vtx-2005"}, "svm": {"vendor": "svm"}}
SEEN = ("exit", "console", "state", "guest_instructions")


@pytest.fixture
def guest(tmp_path):
    """guest(body, data=""): a ring-0 guest with pm.inc's GDT/IDT/TSS that runs ``body`` then exits 0."""
    for include in ("pm.inc", "platform.inc"):          # pm.inc includes the platform macro layer
        shutil.copy(ROOT / "samples" / "guests" / include, tmp_path)

    def make(body: str, data: str = "", name: str = "g") -> str:
        path = tmp_path / f"{name}.s"
        path.write_text(f'        .include "pm.inc"\n_start:\n        pm_setup\n{body}\n        exit 0\n{data}\n'
                        "        .align 4\n        pm_data\n")
        return str(path)
    return make


def exits(path: str, **options) -> dict:
    return run_guest(path, "hvm", **options).events.get("exit", {})


def same_as_native(path: str, **options):
    native, hvm = run_guest(path, "native").to_dict(), run_guest(path, "hvm", **options).to_dict()
    assert {k: native[k] for k in SEEN} == {k: hvm[k] for k in SEEN}
    return hvm


LOOP = """        mov ecx, {n}
again:
        {insn}
        dec ecx
        jnz again"""


# --- exact counts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, name", [("kvm", "CPUID"), ("vtx-2005", "CPUID"), ("svm", "CPUID")])
def test_a_loop_of_n_cpuid_gives_n_cpuid_exits(guest, variant, name):
    path = guest(LOOP.format(n=1000, insn="push ecx\n        mov eax, 0\n        cpuid\n        pop ecx"))
    found = exits(path, **VARIANTS[variant])
    io = "IOIO" if variant == "svm" else "IO_INSTRUCTION"
    assert found == {name: 1000, io: 1}            # and the one out to the exit port


def test_ten_thousand_cli_give_no_exit(guest):
    path = guest(LOOP.format(n=10_000, insn="cli"))
    assert exits(path) == {"IO_INSTRUCTION": 1}
    same_as_native(path)


def test_sensitive_unprivileged_instructions_never_exit_on_vtx(guest):
    body = LOOP.format(n=10, insn="pushfd\n        popfd\n        sgdt [0x1000]\n        sidt [0x1000]\n"
                                  "        smsw ax\n        str ax\n        mov ax, ds\n        mov ds, ax\n"
                                  "        lar eax, ecx\n        verr cx")
    assert exits(guest(body)) == {"IO_INSTRUCTION": 1}


def test_cr0_writes_exit_only_when_they_change_a_masked_bit(guest):
    body = """        mov eax, cr0
        mov cr0, eax
        or eax, 0x20
        mov cr0, eax
        clts
        mov ebx, cr0
        mov eax, cr4
        mov cr4, eax
        or eax, 0x200
        mov cr4, eax"""
    path = guest(body)
    assert exits(path) == {"CR_ACCESS": 2, "IO_INSTRUCTION": 1}            # NE set, OSFXSR set; TS is the guest's
    assert exits(path, control=("cr0-mask=0xffffffff",)) == {"CR_ACCESS": 2, "IO_INSTRUCTION": 1}
    assert exits(path, control=("cr0-mask=0", "cr4-mask=0")) == {"IO_INSTRUCTION": 1}
    assert exits(path, vendor="svm") == {"CR0_WRITE": 1, "CR4_WRITE": 1, "IOIO": 1}
    same_as_native(path)


def test_cr3_exits_only_without_nested_paging(guest):
    path = guest("        mov eax, cr3\n        mov cr3, eax\n        mov ebx, cr3")
    assert exits(path) == {"IO_INSTRUCTION": 1}
    assert exits(path, controls="vtx-2005") == {"CR_ACCESS": 3, "IO_INSTRUCTION": 1}
    assert exits(path, vendor="svm", controls="vtx-2005") == {"CR3_READ": 2, "CR3_WRITE": 1, "IOIO": 1}
    same_as_native(path, controls="vtx-2005")


def test_io_exits_per_port_with_the_io_bitmap(guest):
    body = LOOP.format(n=100, insn="in al, 0x80\n        mov dx, 0x3fd\n        in al, dx")
    path = guest(body)
    assert exits(path) == {"IO_INSTRUCTION": 201}
    assert exits(path, control=("io-bitmap=0x3f8-0x3ff",)) == {"IO_INSTRUCTION": 100}
    assert exits(path, control=("io-bitmap=0xf4",)) == {"IO_INSTRUCTION": 1}
    assert exits(path, control=("unconditional-io-exiting=off",)) == {}


def test_a_rep_string_io_is_one_exit_and_counts_as_natively(guest):
    path = guest("        mov ecx, 5\n        mov esi, 0x1000\n        mov dx, 0x80\n        rep outsb")
    assert exits(path) == {"IO_INSTRUCTION": 2}
    same_as_native(path)


def test_msr_exits_follow_the_msr_bitmap(guest):
    body = LOOP.format(n=10, insn="push ecx\n        mov ecx, 0x174\n        rdmsr\n        wrmsr\n"
                                  "        mov ecx, 0x10\n        rdmsr\n        pop ecx")
    path = guest(body)
    assert exits(path) == {"MSR_READ": 20, "MSR_WRITE": 10, "IO_INSTRUCTION": 1}
    assert exits(path, control=("msr-bitmap=0x174",)) == {"MSR_READ": 10, "MSR_WRITE": 10, "IO_INSTRUCTION": 1}
    assert exits(path, vendor="svm") == {"MSR": 30, "IOIO": 1}


def test_descriptor_table_exiting(guest):
    path = str(ROOT / "samples" / "guests" / "store_tables.s")
    assert not {"GDTR_IDTR", "LDTR_TR"} & set(exits(path))
    found = same_as_native(path, control=("descriptor-table-exiting=on",))["events"]["exit"]
    assert found["GDTR_IDTR"] == 4 and found["LDTR_TR"] == 4      # lgdt lidt sgdt sidt; lldt ltr sldt str


def test_exception_bitmap(guest):
    path = str(ROOT / "samples" / "nanobench" / "divzero.s")
    assert "EXCEPTION_NMI" not in exits(path)
    hvm = same_as_native(path, control=("exception-bitmap=#DE,#MC",))
    assert hvm["events"]["exit"]["EXCEPTION_NMI"] == 1000
    assert exits(path, vendor="svm", control=("exception-bitmap=0",))["EXCP0"] == 1000


def test_shadow_paging_exits_on_the_nanobenchmarks():
    pgfault, ptemod = (str(ROOT / "samples" / "nanobench" / f"{n}.s") for n in ("pgfault", "ptemod"))
    assert exits(pgfault) == {"CR_ACCESS": 1, "IO_INSTRUCTION": 1}          # nested paging: only the CR0 write
    # shadow paging fills the PDE on demand: the first access through it is one more #PF exit (hidden), in
    # which the monitor sets the guest PDE's accessed bit as the CPU would
    assert exits(pgfault, controls="vtx-2005") == {"CR_ACCESS": 2, "EXCEPTION_NMI": 1001, "INVLPG": 1000,
                                                   "IO_INSTRUCTION": 1}
    assert exits(ptemod, controls="vtx-2005") == {"CR_ACCESS": 2, "EXCEPTION_NMI": 1, "INVLPG": 1000,
                                                  "IO_INSTRUCTION": 1}
    for path in (pgfault, ptemod):
        same_as_native(path, controls="vtx-2005")


def test_the_paging_sample_under_both_control_sets():
    path = str(ROOT / "samples" / "guests" / "paging.s")
    assert same_as_native(path)["events"]["exit"] == {"CR_ACCESS": 1, "IO_INSTRUCTION": 291}
    hvm = same_as_native(path, controls="vtx-2005")
    # the guest's true #PF, and the hidden one of the PDE's first access (its accessed bit, filled on demand)
    assert hvm["events"]["exit"] == {"CR_ACCESS": 3, "EXCEPTION_NMI": 2, "INVLPG": 2, "IO_INSTRUCTION": 291}
    assert hvm["state"]["cr3"] == 0x180000                 # the guest's CR3, not the shadow directory


def test_an_access_outside_guest_ram_is_an_ept_violation(guest):
    body = "        set_gate 13, on_gp, INTGATE\n        mov dword ptr [0x7000000], 1"
    path = guest(body, "on_gp:\n        exit 0x55")
    assert exits(path) == {"EPT_VIOLATION": 1, "IO_INSTRUCTION": 1}
    assert exits(path, vendor="svm") == {"NPF": 1, "IOIO": 1}
    assert "EPT_VIOLATION" not in exits(path, controls="vtx-2005")
    same_as_native(path)


def test_timer_interrupts_exit_and_are_injected_where_native_takes_them():
    path = str(ROOT / "samples" / "guests" / "critical_section.s")
    native = run_guest(path, "native").to_dict()
    hvm = same_as_native(path)
    taken = sum(native["events"]["external-interrupt"].values())
    assert sum(hvm["events"]["inject"].values()) == taken
    # one exit per request; the last request may still wait for IF when the guest ends
    assert taken <= hvm["events"]["exit"]["EXTERNAL_INTERRUPT"] <= taken + 1
    assert 0 < hvm["events"]["exit"]["INTERRUPT_WINDOW"] <= taken
    off = run_guest(path, "hvm", control=("external-interrupt-exiting=off",)).events["exit"]
    assert "EXTERNAL_INTERRUPT" not in off and "INTERRUPT_WINDOW" not in off


def test_hlt_exits(guest):
    path = str(ROOT / "samples" / "guests" / "kernel.s")
    assert exits(path)["HLT"] == 3
    assert "HLT" not in exits(path, control=("hlt-exiting=off",))
    same_as_native(path, control=("hlt-exiting=off",))


def test_svm_only_intercepts(guest):
    body = "        set_gate 0x30, on_int, INTGATE\n" + LOOP.format(n=10, insn="pushfd\n        popfd\n        int 0x30")
    path = guest(body, "on_int:\n        iretd")
    on = ("pushf-intercept=on", "popf-intercept=on", "iret-intercept=on", "swint-intercept=on")
    assert exits(path, vendor="svm", control=on) == {"PUSHF": 10, "POPF": 10, "SWINT": 10, "IRET": 10, "IOIO": 1}
    assert exits(path, vendor="svm") == {"IOIO": 1}
    assert exits(path, control=on) == {"IO_INSTRUCTION": 1}                 # VT-x has no such exits
    same_as_native(path, vendor="svm", control=on)


@pytest.mark.parametrize("insn, vtx, svm", [("vmcall", "VMCALL", None), ("vmxon [0x1000]", "VMXON", None),
                                            ("vmmcall", None, "VMMCALL"), ("vmrun eax", None, "VMRUN")])
def test_virtualization_instructions_exit_then_ud_as_natively(guest, insn, vtx, svm):
    path = guest(f"        set_gate 6, on_ud, INTGATE\n        {insn}\n        exit 1", "on_ud:\n        exit 0x66")
    native = run_guest(path, "native")
    assert native.exit.code == 0x66                        # #UD on the bare machine
    for vendor, name in (("vtx", vtx), ("svm", svm)):
        result = run_guest(path, "hvm", vendor=vendor)
        assert result.exit.code == 0x66
        assert result.events.get("exit", {}).get(name, 0) == (1 if name else 0) or name is None


def test_triple_fault_exit(guest):
    path = guest("        lidt [bad]\n        int3", "bad: .word 0\n        .dword 0")
    result = run_guest(path, "hvm")
    assert result.exit.reason == "triple-fault" and result.events["exit"] == {"TRIPLE_FAULT": 1}


# --- cpuid: the one difference on purpose ------------------------------------------------------------------
def test_cpuid_differs_only_by_the_hypervisor_bit_and_leaves(guest):
    body = ("        mov eax, 1\n        cpuid\n        mov [leaf1], ecx\n        mov eax, 0x40000000\n"
            "        cpuid\n        mov eax, [leaf1]")
    path = guest(body, "leaf1: .dword 0")
    native, hvm = run_guest(path, "native"), run_guest(path, "hvm")
    assert not bare(1, 0)[2] & (1 << 31)                 # the bare machine: 0, as the hardware
    assert hvm.state["eax"] == native.state["eax"] | 1 << 31   # leaf 1 ECX as natively but the hypervisor bit
    assert (hvm.state["ebx"], hvm.state["ecx"], hvm.state["edx"]) == (0x4B4D564B, 0x564B4D56, 0x4D)  # KVMKVMKVM
    assert (native.state["ebx"], native.state["ecx"], native.state["edx"]) == (0, 0, 0)
    off = run_guest(path, "hvm", control=("cpuid-hypervisor-bit=off",))
    assert off.state == native.state


def test_popek_diff_names_the_cpuid(guest):
    path = guest("        mov eax, 0x40000000\n        cpuid")
    out = subprocess.run([sys.executable, "-m", "popek.cli", "diff", path, "--monitor", "hvm"],
                         capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert "cpuid" in out.stdout and "ebx" in out.stdout


# --- every sample guest, every control set ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["vtx-2005", "svm"])
@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_sample_guests_under_hvm_equal_native(path, variant):
    same_as_native(str(path), **VARIANTS[variant])


def test_trace_exits_in_order(guest):
    path = guest("        mov eax, 1\n        cpuid\n        mov dx, 0x80\n        out dx, al")
    ops_trace = []
    run_guest(path, "hvm", trace_exits=ops_trace.append)
    assert [line.split()[2] for line in ops_trace] == ["CPUID", "IO_INSTRUCTION", "IO_INSTRUCTION"]
    assert "leaf 0x1" in ops_trace[0] and "out port 0x80 size 1" in ops_trace[1]


# --- the data: control sets and the ISA description's exit lines -----------------------------------------------
def test_bundled_control_sets_give_every_setting_a_source_or_assumption():
    for name in ("kvm", "vtx-2005", "svm"):
        c = control_sets.load(name)
        assert set(c.values) == set(control_sets.SETTINGS)
        assert all(c.origin[k] for k in c.values)
    assert control_sets.load("kvm")["nested-paging"] and not control_sets.load("vtx-2005")["nested-paging"]


def test_every_exit_line_names_known_controls():
    for model in ("vtx", "svm"):
        for e in bundled().model(model).exits:
            assert all(k == "always" or k in control_sets.SETTINGS for k in e.controls), e


def test_exit_lines_in_a_description_and_their_errors():
    text = ('isa toy "t"\ninstruction foo {\n match foo\n category privileged\n privileged yes\n'
            ' deprivileged trap "x"\n}\nmodel m "m" {\n guest-ring 0\n exit foo reason 0x10 FOO control always "why"\n'
            ' exit exception reason 0x40 EXCPn control exception-bitmap "x"\n}\n')
    m = parse(text).models["m"]
    assert m.exits_for("foo")[0].reason_for() == (16, "FOO")
    assert m.exits_for("exception")[0].reason_for(14) == (0x4E, "EXCP14")
    with pytest.raises(Exception, match="undefined instruction or exit event 'bar'"):
        parse(text.replace("exit foo", "exit bar"))


def test_theorem_explains_exits():
    out = subprocess.run([sys.executable, "-m", "popek.cli", "theorem", "vtx"], capture_output=True, text=True)
    assert "exit 10 CPUID (always)" in out.stdout


# --- bad options -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--control", "bogus=1"], "unknown control 'bogus'"),
    (["--control", "hlt-exiting=maybe"], "expected on or off"),
    (["--control", "cr0-mask=zero"], "expected a number"),
    (["--control", "io-bitmap=0x10000"], "out of range"),
    (["--control", "exception-bitmap=#XX"], "not one of the vectors"),
    (["--control", "nested-paging"], "expected KEY=VALUE"),
    (["--controls", "nope"], "no control set 'nope'"),
    (["--control", "nested-paging=off", "--control", "exception-bitmap=#MC"], "needs #PF"),
    (["--vendor", "arm"], "invalid choice"),
])
def test_bad_options_are_one_line_errors(guest, args, message):
    out = subprocess.run([sys.executable, "-m", "popek.cli", "run", guest(""), "--monitor", "hvm", *args],
                         capture_output=True, text=True)
    last = out.stderr.strip().splitlines()[-1]              # argparse prints its usage first
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert last.startswith("popek run: error:") and message in last


@pytest.mark.parametrize("text, message", [
    ('vendor = "vtx"\n[settings\n', "not a valid control file"),
    ('vendor = "arm"\n[settings]\n', "'vendor' must be one of"),
    ('vendor = "vtx"\n[settings]\nhlt-exiting = { value = true }\n', "needs a 'source' or an 'assumed'"),
    ('vendor = "vtx"\n[settings]\nhlt-exiting = { value = true, source = "x" }\n', "missing settings"),
    ('vendor = "vtx"\n[settings]\nhlt-exiting = { value = 3, source = "x" }\n', "expected on/off"),
])
def test_malformed_control_files(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises((BadInput, UsageError), match=message):
        control_sets.load(str(path))


def test_a_control_file_of_ones_own(tmp_path, guest):
    text = (ROOT / "popek" / "monitors" / "hvm" / "controls" / "kvm.toml").read_text()
    path = tmp_path / "mine.toml"
    path.write_text(text.replace('hlt-exiting = { value = true', 'hlt-exiting = { value = false'))
    assert "HLT" not in exits(str(ROOT / "samples" / "guests" / "kernel.s"), controls=str(path))


def test_hvm_options_are_refused_for_other_monitors(guest):
    out = subprocess.run([sys.executable, "-m", "popek.cli", "run", guest(""), "--controls", "kvm"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "only for --monitor hvm" in out.stderr
