"""hvm: the exception bitmap applies to exceptions raised while delivering another event (SDM Vol. 3C,
"VM exits during event delivery"), and a triple fault that no bitmap bit catches is TRIPLE_FAULT (VT-x basic
exit reason 2) or SHUTDOWN (AMD-V exit code 0x7F). The guest has no IDT: #DE's delivery raises #GP, the
pair makes #DF, whose delivery raises #GP again: a triple fault."""
from __future__ import annotations

import pytest

from popek.monitors import run_guest

DIVIDE = """        .org 0x00100000
_start:
        xor ecx, ecx
        div ecx
        hlt
"""
DIV_AT = 0x100002


@pytest.fixture
def no_idt(tmp_path):
    path = tmp_path / "de-no-idt.s"
    path.write_text(DIVIDE)
    return str(path)


def trace(path: str, **options) -> list[tuple[int, str, str]]:
    from popek.machine.machine import Machine
    from popek.machine.guest import load_guest
    from popek.monitors import get_monitor
    from popek.monitors.base import run

    machine = Machine()
    machine.load(load_guest(path))
    monitor = get_monitor("hvm", trace_exits=True, **options)
    result = run(machine, monitor, 1000)
    assert result.exit.reason == "triple-fault"          # the guest ends as on the bare machine
    return [(r.address, f"{r.reason:#x} {r.reason_name}", r.qualification) for r in monitor.trace]


@pytest.mark.parametrize("vendor, reason", [("vtx", "0x2 TRIPLE_FAULT"), ("svm", "0x7f SHUTDOWN")])
def test_no_bitmap_bit_a_triple_fault_exit(no_idt, vendor, reason):
    assert trace(no_idt, vendor=vendor) == [(DIV_AT, reason, "#GP while delivering #DF")]


@pytest.mark.parametrize("vendor, reason", [("vtx", "0x0 EXCEPTION_NMI"), ("svm", "0x4d EXCP13")])
def test_gp_in_the_bitmap_exits_during_delivery_with_the_event_being_delivered(no_idt, vendor, reason):
    """#GP exits twice (during #DE's delivery, then during #DF's); the second one is the fault that would have
    been the triple fault, so there is no TRIPLE_FAULT exit (SDM: only when that exception does not exit)."""
    got = trace(no_idt, vendor=vendor, control=("exception-bitmap=#GP",))
    assert got == [(DIV_AT, reason, "#GP error 0x3 (IDT-vectoring: #DE)"),     # vector 0 * 8 + 2 + EXT
                   (DIV_AT, reason, "#GP error 0x43 (IDT-vectoring: #DF)")]    # vector 8 * 8 + 2 + EXT


@pytest.mark.parametrize("vendor, df, triple", [("vtx", "0x0 EXCEPTION_NMI", "0x2 TRIPLE_FAULT"),
                                                ("svm", "0x48 EXCP8", "0x7f SHUTDOWN")])
def test_df_in_the_bitmap_exits_for_the_double_fault_then_the_triple_fault(no_idt, vendor, df, triple):
    got = trace(no_idt, vendor=vendor, control=("exception-bitmap=#DF",))
    assert got == [(DIV_AT, df, "#DF error 0x0 (IDT-vectoring: #DE)"),
                   (DIV_AT, triple, "#GP while delivering #DF")]


def test_the_first_exception_exits_before_delivery_without_idt_vectoring(no_idt):
    got = trace(no_idt, control=("exception-bitmap=#DE",))
    assert got == [(DIV_AT, "0x0 EXCEPTION_NMI", "#DE"), (DIV_AT, "0x2 TRIPLE_FAULT", "#GP while delivering #DF")]


def test_counted_by_reason_and_the_same_end_as_natively(no_idt):
    native = run_guest(no_idt, "native").to_dict()
    hvm = run_guest(no_idt, "hvm", control=("exception-bitmap=#GP,#DF",))
    assert {k: native[k] for k in ("exit", "state")} == {k: hvm.to_dict()[k] for k in ("exit", "state")}
    assert hvm.events["exit"] == {"EXCEPTION_NMI": 2}    # #GP (during #DE), #GP (during #DF); no #DF: #GP exited


def test_int3_and_into_exit_by_the_bitmap_int_n_does_not(tmp_path):
    """SDM 3C: the exception bitmap also applies to the exceptions INT3 and INTO generate (not to int n)."""
    path = tmp_path / "int3.s"
    path.write_text(DIVIDE.replace("xor ecx, ecx\n        div ecx", "int3"))
    got = trace(str(path), control=("exception-bitmap=#BP",))
    assert got[0] == (0x100000, "0x0 EXCEPTION_NMI", "#BP")
