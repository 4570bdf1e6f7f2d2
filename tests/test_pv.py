"""The pv monitor against its contract (docs/pv.md): boot state, every hypercall with its error cases,
validation, event channels and the timer, trap-table delivery, direct traps, crashes, and the counts that
show what porting buys.

Each test assembles a small PV guest (``-D PV`` with samples/guests/pm.inc and platform.inc) whose
hypercall results go to ``RESULTS`` in guest memory, runs it under pv, and reads them back.
"""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from popek.asm import assemble_text
from popek.events import monitor_entries as entries
from popek.machine.guest import Guest, load_guest
from popek.machine.machine import Machine
from popek.monitors import run_guest
from popek.monitors.base import Run
from popek.monitors.pv import ParaVirtual
from popek.monitors.pv_abi import EEXIST, EFAULT, EINVAL, ENOSYS, EPERM, FLAT_RING1_CS, FLAT_RING1_DS

GUESTS = Path(__file__).resolve().parent.parent / "samples" / "guests"
RESULTS = 0x300000
TOP = 32 << 20

SHUTDOWN = """
finish:
        mov ebx, 2
        mov ecx, shutdown_reason
        mov eax, 29
        int 0x82
        hlt
shutdown_reason: .dword 0
"""


# A trap table whose only entry sends #GP to the guest's label ``gp``.
GP_TRAP_TABLE = """
        .align 8
traps:  .byte 13, 0
        .word 0xE019
        .dword gp
        .dword 0, 0
"""


def hypercall(slot: int, nr: int, *args) -> str:
    """One hypercall with literal arguments; its result (EAX) goes to RESULTS + 4 * slot."""
    regs = ("ebx", "ecx", "edx", "esi", "edi")
    moves = "\n".join(f"        mov {r}, {a}" for r, a in zip(regs, args))
    return f"{moves}\n        mov eax, {nr}\n        int 0x82\n        mov dword ptr [{RESULTS + 4 * slot}], eax\n"


def build(body: str, data: str = "", pv: bool = True) -> Guest:
    text = f'        .include "pm.inc"\n_start:\n{body}\n{SHUTDOWN}\n{data}\n        pm_data\n'
    program = assemble_text(text, defines={"PV": 1} if pv else None, include_dirs=(str(GUESTS),))
    return Guest("test", ((program.origin, bytes(program.image)),), program.entry, "asm", dict(program.symbols))


def run_pv(body: str, data: str = "", budget: int = 200_000):
    machine = Machine()
    machine.load(build(body, data))
    ops = ParaVirtual()
    r = Run(machine, ops, budget)
    r.step()
    return machine, r.result()


def results(machine: Machine, n: int) -> list[int]:
    return [struct.unpack("<i", machine.memory.read(RESULTS + 4 * i, 4))[0] for i in range(n)]


# --- boot state --------------------------------------------------------------------------------------------
def test_boot_state_start_info_and_shared_info():
    body = f"""
        mov dword ptr [{RESULTS}], esi
        mov dword ptr [{RESULTS + 4}], esp
        pushfd
        pop eax
        mov dword ptr [{RESULTS + 8}], eax
        mov eax, cs
        mov dword ptr [{RESULTS + 12}], eax
        mov eax, ds
        mov dword ptr [{RESULTS + 16}], eax
        mov eax, ss
        mov dword ptr [{RESULTS + 20}], eax
"""
    machine, result = run_pv(body)
    esi, esp, eflags, cs, ds, ss = (v & 0xFFFFFFFF for v in results(machine, 6))
    assert (esi, esp, eflags, cs & 0xFFFF, ds & 0xFFFF, ss & 0xFFFF) == (
        TOP - 0x2000, 0x90000, 0x202, FLAT_RING1_CS, FLAT_RING1_DS, FLAT_RING1_DS)
    start = machine.memory.read(TOP - 0x2000, 84)
    assert start[:32].rstrip(b"\0") == b"xen-3.0-x86_32"
    assert struct.unpack_from("<II", start, 32) == (TOP // 4096, TOP - 0x1000)
    assert machine.memory.u8(TOP - 0x1000 + 1) == 1            # evtchn_upcall_mask
    assert result.exit.reason == "shutdown" and result.exit.code == 0
    assert result.state["cpl"] == 1 and result.state["cs"] == FLAT_RING1_CS


def test_cmdline_lands_in_start_info():
    machine = Machine()
    machine.load(build(""))
    Run(machine, ParaVirtual(cmdline="console=hvc0"), 1000).step()
    assert machine.memory.read(TOP - 0x2000 + 80, 13) == b"console=hvc0\0"


# --- simple hypercalls ---------------------------------------------------------------------------------------
def test_xen_version_unknown_numbers_and_console_io():
    body = (hypercall(0, 17, 0, 0) + hypercall(1, 17, 1, 0) + hypercall(2, 99) + hypercall(3, 1, 0, 0, 0)
            + hypercall(4, 18, 0, 3, "text") + hypercall(5, 18, 0, 4, 0x7FFFFF0) + hypercall(6, 18, 1, 4, "text")
            + hypercall(7, 18, 7, 0, 0))
    machine, result = run_pv(body, 'text: .ascii "pv!"')
    assert results(machine, 8) == [4 << 16 | 17, -ENOSYS, -ENOSYS, -ENOSYS, 3, -EFAULT, 0, -ENOSYS]
    assert result.console == "pv!"
    assert result.events["hypercall"] == {"console_io": 4, "mmu_update": 1, "sched_op": 1, "unknown": 1,
                                          "xen_version": 2}


def test_hypercall_preserves_argument_registers():
    body = """
        mov ebx, 0
        mov ecx, 0x1111
        mov edx, 0x2222
        mov esi, 0x3333
        mov edi, 0x4444
        mov eax, 17
        int 0x82
""" + "".join(f"        mov dword ptr [{RESULTS + 4 * i}], {r}\n" for i, r in enumerate(("ecx", "edx", "esi", "edi")))
    machine, _ = run_pv(body)
    assert results(machine, 4) == [0x1111, 0x2222, 0x3333, 0x4444]


def test_shutdown_reason_is_the_exit_code():
    machine, result = run_pv("        mov dword ptr [shutdown_reason], 3\n")
    assert (result.exit.reason, result.exit.code) == ("shutdown", 3)


# --- trap table, traps and direct traps ----------------------------------------------------------------------
def test_set_trap_table_entries_errors_and_delivery():
    body = (hypercall(0, 0, "traps") + hypercall(1, 0, "bad_cs") + hypercall(2, 0, 0x7FFFFF8)
            + "        int 0x81\n" + f"        mov dword ptr [{RESULTS + 12}], eax\n")
    data = f"""
handler:
        mov eax, dword ptr [esp + 4]
        mov dword ptr [{RESULTS + 16}], eax
        mov eax, 0x81
        iretd
        .align 8
traps:  .byte 0x81, 1
        .word 0xE018                    ; RPL 0: taken as RPL 1
        .dword handler
        .dword 0, 0
bad_cs: .byte 0x81, 1
        .word 0xE008                    ; a hypervisor selector
        .dword handler
        .dword 0, 0
"""
    machine, result = run_pv(body, data)
    assert results(machine, 5) == [0, -EPERM, -EFAULT, 0x81, FLAT_RING1_CS]
    assert result.events["reflect"] == {"int 0x81": 1}


def test_int_from_ring3_through_a_dpl3_trap_entry_is_a_direct_trap():
    body = hypercall(0, 0, "traps") + hypercall(1, 3, FLAT_RING1_DS, 0x80000) + """
        push 0xE033
        push 0x70000
        push 0x202
        push 0xE02B
        push user
        iretd
user:
        mov ecx, 10
again:  int 0x80
        loop again
        int 0x81
"""
    data = f"""
sys:    iretd
done:   mov dword ptr [{RESULTS + 8}], esp
        jmp finish
        .align 8
traps:  .byte 0x80, 3
        .word 0xE019
        .dword sys
        .byte 0x81, 3 | 4               ; masks events: not direct
        .word 0xE019
        .dword done
        .dword 0, 0
"""
    machine, result = run_pv(body, data)
    assert results(machine, 3) == [0, 0, 0x80000 - 20]
    assert result.events["direct-trap"] == {"int 0x80": 10}
    assert result.events["reflect"] == {"int 0x81": 1}
    assert "int 0x80" not in result.events.get("reflect", {})


def test_hypercall_from_ring3_is_a_gp_for_the_guest():
    body = hypercall(0, 0, "traps") + hypercall(1, 3, FLAT_RING1_DS, 0x80000) + """
        push 0xE033
        push 0x70000
        push 0x2
        push 0xE02B
        push user
        iretd
user:   mov eax, 17
        int 0x82
"""
    data = f"""
gp:     mov eax, dword ptr [esp]
        mov dword ptr [{RESULTS + 8}], eax
        jmp finish
""" + GP_TRAP_TABLE
    machine, result = run_pv(body, data)
    assert results(machine, 3)[2] == 0x82 * 8 + 2
    assert result.exit.reason == "shutdown"


@pytest.mark.parametrize("instruction, message", [
    ("cli", "cli at 0x100000: a PV kernel sets evtchn_upcall_mask in shared_info"),
    ("mov al, 1\n        out 0x21, al", "out 0x21 at 0x100002: not a granted port"),
    ("hlt", "hlt at 0x100000: a PV kernel calls HYPERVISOR_sched_op(SCHEDOP_block)"),
    ("lidt [0]", "lidt at 0x100000: a PV kernel calls HYPERVISOR_set_trap_table"),
])
def test_unported_privileged_instruction_crashes_the_domain_and_says_why(instruction, message):
    machine = Machine()
    machine.load(build(f"        {instruction}\n", pv=False))
    r = Run(machine, ParaVirtual(), 1000)
    r.step()
    result = r.result()
    assert result.exit.reason == "crash"
    assert result.exit.why.startswith(message), result.exit.why
    assert "crash" in result.render_text()


def test_an_exception_with_no_entry_crashes_naming_vector_and_instruction():
    machine, result = run_pv("        xor ecx, ecx\n        div ecx\n")
    assert result.exit.reason == "crash"
    assert result.exit.why.startswith("#DE at 0x100002 (div ecx): no trap-table entry for vector 0x0")


# --- descriptor tables ----------------------------------------------------------------------------------------
GDT_PAGE = 0x200000


def gdt_data(*descriptors: tuple[int, int]) -> str:
    """The descriptors at gdt_source (copy_gdt puts them in the GDT page), and frame lists."""
    rows = "\n".join(f"        .dword {lo:#x}, {hi:#x}" for lo, hi in descriptors)
    return f"        .align 8\ngdt_source:\n{rows}\nframes: .dword {GDT_PAGE >> 12}\nbad_frames: .dword 0x7FFF\n"


def copy_gdt(n: int) -> str:
    return f"""
        mov esi, gdt_source
        mov edi, {GDT_PAGE}
        mov ecx, {2 * n}
        rep movsd
"""


RING1_DATA = (0x0000FFFF, 0x00CFB200)
RING1_CODE = (0x0000FFFF, 0x00CFBA00)
RING0_CODE = (0x0000FFFF, 0x00CF9A00)
TSS = (0x00000067, 0x00008900)


def test_set_gdt_validates_and_installs():
    body = copy_gdt(3) + hypercall(0, 2, "frames", 3) + """
        mov ax, 0x11                    ; the guest's own ring-1 data segment
        mov es, ax
        mov eax, es
""" + f"        mov dword ptr [{RESULTS + 4}], eax\n" + hypercall(2, 2, "frames", 7169) + hypercall(3, 2, "bad_frames", 1)
    machine, result = run_pv(body, gdt_data((0, 0), RING1_CODE, RING1_DATA))
    assert results(machine, 4) == [0, 0x11, -EINVAL, -EINVAL]
    assert result.state["gdtr"] == {"base": GDT_PAGE, "limit": 23}


@pytest.mark.parametrize("bad", [RING0_CODE, TSS, (0x00100000, 0x0000EC00)], ids=["ring-0 code", "tss", "call gate to 0x10"])
def test_set_gdt_rejects_a_bad_descriptor_and_changes_nothing(bad):
    body = copy_gdt(3) + hypercall(0, 2, "frames", 3)
    machine, result = run_pv(body, gdt_data((0, 0), RING1_DATA, bad))
    assert results(machine, 1) == [-EINVAL]
    assert result.state["gdtr"] == {"base": 0, "limit": 0}


def test_a_store_into_an_installed_gdt_faults_and_update_descriptor_changes_it():
    body = copy_gdt(2) + hypercall(0, 0, "traps") + hypercall(1, 2, "frames", 2) + f"""
        mov dword ptr [{GDT_PAGE + 8}], 0
""" + hypercall(3, 10, GDT_PAGE + 8, 0, RING1_CODE[0], RING1_CODE[1]) \
        + hypercall(4, 10, GDT_PAGE + 8, 0, RING0_CODE[0], RING0_CODE[1]) \
        + hypercall(5, 10, GDT_PAGE + 4, 0, RING1_DATA[0], RING1_DATA[1]) \
        + hypercall(6, 10, TOP, 0, RING1_DATA[0], RING1_DATA[1]) \
        + f"        mov eax, dword ptr [{GDT_PAGE + 12}]\n        mov dword ptr [{RESULTS + 28}], eax\n"
    data = f"""
gp:     mov dword ptr [{RESULTS + 8}], 0xD0D0
        add dword ptr [esp + 4], 10     ; skip the 10-byte store
        add esp, 4
        iretd
        .align 8
traps:  .byte 13, 0
        .word 0xE019
        .dword gp
        .dword 0, 0
gdt_source:
        .dword 0, 0
        .dword {RING1_DATA[0]:#x}, {RING1_DATA[1]:#x}
frames: .dword {GDT_PAGE >> 12}
"""
    machine, result = run_pv(body, data)
    assert results(machine, 8) == [0, 0, 0xD0D0, 0, -EINVAL, -EINVAL, -EINVAL, RING1_CODE[1]]
    assert machine.memory.u32(GDT_PAGE + 12) == RING1_CODE[1]


def test_stack_switch_and_set_callbacks_check_selectors():
    body = (hypercall(0, 3, 0xE023, 0x80000) + hypercall(1, 3, 0xE020, 0x80000) + hypercall(2, 3, 0xE021, 0x80000)
            + hypercall(3, 4, 0xE008, "cb", 0xE019, "cb") + hypercall(4, 4, 0xE019, "cb", 0xE019, "cb"))
    machine, _ = run_pv(body, "cb: iretd")
    assert results(machine, 5) == [-EINVAL, 0, 0, -EPERM, 0]


def test_hypercall_write_backs_into_an_installed_gdt_frame_are_efault():
    """The multicall result and bind_virq's port used to land in the read-only GDT frame."""
    body = copy_gdt(2) + f"""
        mov dword ptr [{GDT_PAGE + 0x800}], 17          ; a multicall entry: xen_version(0)
        mov dword ptr [{GDT_PAGE + 0x804}], 0x11111111
        mov dword ptr [{GDT_PAGE + 0x828}], 0x22222222  ; bind_virq(VIRQ_TIMER, vcpu 0)'s port field
""" + hypercall(0, 2, "frames", 2) + hypercall(1, 13, GDT_PAGE + 0x800, 1) + hypercall(2, 32, 1, GDT_PAGE + 0x820) \
        + hypercall(3, 32, 1, "bind")
    machine, result = run_pv(body, gdt_data((0, 0), RING1_DATA) + "bind: .dword 0, 0, 0\n")
    # the bind whose write-back failed still bound the VIRQ, as Xen leaves it: a second bind is -EEXIST
    assert results(machine, 4) == [0, -EFAULT, -EFAULT, -EEXIST]
    assert machine.memory.u32(GDT_PAGE + 0x804) == 0x11111111
    assert machine.memory.u32(GDT_PAGE + 0x828) == 0x22222222
    assert result.events["multicall"] == {"xen_version": 1}


def test_a_bounce_frame_into_an_installed_gdt_frame_crashes_the_domain():
    """A stack inside the GDT frame used to get the #GP frame written there (guest-controlled descriptors)."""
    body = copy_gdt(2) + hypercall(0, 0, "traps") + hypercall(1, 2, "frames", 2) + f"""
        mov esp, {GDT_PAGE + 0x40}
        cli
"""
    machine, result = run_pv(body, gdt_data((0, 0), RING1_DATA) + GP_TRAP_TABLE + "gp: iretd\n")
    assert results(machine, 2) == [0, 0]
    assert result.exit.reason == "crash"
    assert "the bounce frame for #GP" in result.exit.why and "GDT frame" in result.exit.why
    assert machine.memory.read(GDT_PAGE + 0x10, 0x30) == bytes(0x30)


def test_set_gdt_refuses_the_start_info_and_shared_info_frames():
    machine, _ = run_pv(hypercall(0, 2, "top_frames", 1), f"top_frames: .dword {(TOP >> 12) - 1}\n")
    assert results(machine, 1) == [-EINVAL]


# --- multicall -------------------------------------------------------------------------------------------------
def multicall_entries(*entries) -> str:
    return "\n".join(f"        .dword {op}, 0xFFFFFFFF, " + ", ".join(str(a) for a in (list(args) + [0] * 6)[:6])
                     for op, *args in entries)


def test_multicall_runs_entries_in_order_with_one_entry_into_the_hypervisor():
    body = hypercall(0, 13, "calls", 4) + hypercall(1, 13, TOP - 32, 2)
    data = f"""
        .align 8
calls:
{multicall_entries((17, 0), (18, 0, 2, "text"), (99,), (13, "calls", 1))}
text:   .ascii "mc"
"""
    machine, result = run_pv(body, data)
    assert results(machine, 2) == [0, -EFAULT]
    assert result.console == "mc"
    assert result.events["hypercall"]["multicall"] == 2
    # the second multicall's array runs off RAM: -EFAULT before any entry runs (Xen's copy_from_guest)
    assert result.events["multicall"] == {"console_io": 1, "multicall": 1, "unknown": 1, "xen_version": 1}


def test_multicall_results_are_written_back():
    guest = build(hypercall(0, 13, "calls", 3), f"""
        .align 8
calls:
{multicall_entries((17, 0), (13, "calls", 1), (17, 5))}
""")
    machine = Machine()
    machine.load(guest)
    Run(machine, ParaVirtual(), 10_000).step()
    base = guest.symbols["calls"]
    written = [struct.unpack("<i", machine.memory.read(base + 32 * i + 4, 4))[0] for i in range(3)]
    assert written == [4 << 16 | 17, -EINVAL, -ENOSYS]


def test_a_huge_multicall_count_is_efault_at_once():
    """0xFFFFFFFF entries used to run ~2 million entries over all of RAM (17 s): the array is checked up front."""
    machine, result = run_pv(hypercall(0, 13, 0x200000, 0xFFFFFFFF) + hypercall(1, 13, 0x200000, (TOP - 0x200000) // 32 + 1))
    assert results(machine, 2) == [-EFAULT, -EFAULT]
    assert "multicall" not in result.events


def test_a_long_multicall_is_continued_in_batches_each_one_int_0x82():
    guest = build(hypercall(0, 13, "calls", 200) + f"""
        mov dword ptr [{RESULTS + 4}], ebx
        mov dword ptr [{RESULTS + 8}], ecx
""", "        .align 8\ncalls:\n" + "\n".join([multicall_entries((17, 0))] * 200))
    machine = Machine()
    machine.load(guest)
    r = Run(machine, ParaVirtual(), 100_000)
    r.step()
    result = r.result()
    base = guest.symbols["calls"]
    written = {struct.unpack("<i", machine.memory.read(base + 32 * i + 4, 4))[0] for i in range(200)}
    assert results(machine, 3) == [0, base + 192 * 32, 8]     # the continuation's arguments (as on Xen)
    assert written == {4 << 16 | 17}
    assert result.events["hypercall"]["multicall"] == 4        # ceil(200 / 64) entries into the hypervisor
    assert result.events["multicall"] == {"xen_version": 200}


# --- events and the timer --------------------------------------------------------------------------------------
def test_event_channel_errors():
    body = (hypercall(0, 32, 1, "bind") + hypercall(1, 32, 1, "bind") + hypercall(2, 32, 1, "bind5")
            + hypercall(3, 32, 1, "bindcpu") + hypercall(4, 32, 4, "port7") + hypercall(5, 32, 9, "port7")
            + hypercall(6, 32, 99, "bind") + f"        mov eax, dword ptr [bind + 8]\n        mov dword ptr [{RESULTS + 28}], eax\n")
    data = "bind: .dword 0, 0, 0\nbind5: .dword 5, 0, 0\nbindcpu: .dword 1, 3, 0\nport7: .dword 7\n"
    machine, _ = run_pv(body, data)
    assert results(machine, 8) == [0, -EEXIST, -EINVAL, -EINVAL, -EINVAL, -EINVAL, -ENOSYS, 1]


TIMER_GUEST = """
        mov esp, 0x80000
        mov ebp, esi                    ; start_info (set_callbacks takes esi)
""" + hypercall(0, 32, 1, "bind") + hypercall(1, 4, 0xE019, "upcall", 0xE019, "upcall") + """
        mov eax, dword ptr [ebp + 36]
        mov dword ptr [shared], eax
        mov ebx, dword ptr [eax + 48]
        add ebx, 500
        xor ecx, ecx
        mov eax, 15
        int 0x82
        mov ebx, 1                      ; block
        xor ecx, ecx
        mov eax, 29
        int 0x82
""" + f"        mov dword ptr [{RESULTS + 8}], 0xB0B0\n"


def test_timer_and_block_deliver_an_upcall_with_a_bounce_frame():
    data = f"""
upcall:
        mov eax, dword ptr [esp + 8]    ; frame: eip, cs, eflags
        mov dword ptr [{RESULTS + 12}], eax
        mov eax, dword ptr [esp + 4]
        mov dword ptr [{RESULTS + 16}], eax
        mov eax, dword ptr [shared]
        movzx ebx, byte ptr [eax + 1]   ; evtchn_upcall_mask, set by the delivery
        mov dword ptr [{RESULTS + 20}], ebx
        mov ebx, dword ptr [eax + 48]   ; system time
        mov dword ptr [{RESULTS + 24}], ebx
        mov byte ptr [eax], 0
        mov dword ptr [eax + 2048], 0
        iretd
shared: .dword 0
bind:   .dword 0, 0, 0
"""
    machine, result = run_pv(TIMER_GUEST, data)
    r = results(machine, 7)
    assert r[:3] == [0, 0, 0xB0B0]
    assert r[3] & 0x200                         # IF = not mask (0 while blocked)
    assert r[4] == FLAT_RING1_CS and r[5] == 1
    assert r[6] >= 500
    assert result.events["upcall"] == {"event": 1}
    assert result.events["idle"]["clocks"] > 0


def test_an_upcall_with_no_callback_crashes():
    body = TIMER_GUEST.replace(hypercall(1, 4, 0xE019, "upcall", 0xE019, "upcall"), "")
    machine, result = run_pv(body, "upcall: iretd\nshared: .dword 0\nbind: .dword 0, 0, 0\n")
    assert result.exit.reason == "crash"
    assert "no event callback" in result.exit.why


def test_blocking_with_nothing_armed_ends_the_run():
    machine, result = run_pv("        mov ebx, 1\n        mov eax, 29\n        int 0x82\n")
    assert result.exit.reason == "hlt"


# --- bad input never reaches the monitor's memory ---------------------------------------------------------------
def test_failing_hypercalls_leave_monitor_memory_untouched():
    body = (hypercall(0, 2, "frames", 2) + hypercall(1, 0, "bad_cs") + hypercall(2, 10, GDT_PAGE, 0, *RING0_CODE)
            + hypercall(3, 13, 0x7FFFFF0, 3) + hypercall(4, 18, 0, 100, TOP - 10) + hypercall(5, 3, 0xE02B, 0)
            + hypercall(6, 2, 0xFFFFFFF0, 1) + hypercall(7, 0, TOP + 0x1000))
    data = f"""
        .align 8
frames: .dword {GDT_PAGE >> 12}
bad_cs: .byte 3, 0
        .word 0xE00B
        .dword 1
        .dword 0, 0
"""
    machine = Machine()
    machine.load(build(f"        mov dword ptr [{GDT_PAGE + 8}], 0x0000ffff\n        mov dword ptr [{GDT_PAGE + 12}], "
                       f"0x00cf9a00\n" + body, data))
    r = Run(machine, ParaVirtual(), 100_000)
    before = machine.memory.read(machine.memory.ram_size, machine.memory.monitor_end - machine.memory.ram_size)
    r.step()
    assert results(machine, 8) == [-EINVAL, -EPERM, -EINVAL, -EFAULT, -EFAULT, -EINVAL, -EFAULT, -EFAULT]
    assert machine.memory.read(machine.memory.ram_size, machine.memory.monitor_end - machine.memory.ram_size) == before
    assert r.result().exit.reason == "shutdown"


# --- what porting buys ------------------------------------------------------------------------------------------
def test_the_pv_kernel_enters_the_monitor_far_less_than_trap_and_bt():
    native = str(GUESTS / "kernel.s")
    pv = run_guest(load_guest(native, defines={"PV": 1}), monitor="pv")
    trap, bt = run_guest(native, monitor="trap"), run_guest(native, monitor="bt")
    assert pv.events["direct-trap"]["int 0x80"] == 17            # every system call, none through the monitor
    assert "int 0x80" not in pv.events.get("reflect", {})
    assert 3 * entries(pv.events) < entries(trap.events)
    assert 3 * entries(pv.events) < entries(bt.events)


# --- the PV-only sample guests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("guest, exit_code, summary", [
    ("multicall", 0xE0, "multicall: 9 checks, 0 differ"),
    ("descriptors", 0xF0, "descriptors: 7 checks, 0 differ"),
])
def test_pv_only_guests(guest, exit_code, summary):
    result = run_guest(load_guest(str(GUESTS / "pv" / f"{guest}.s"), defines={"PV": 1}), monitor="pv")
    assert result.console.splitlines()[-1] == summary, result.console
    assert "DIFFERS" not in result.console
    assert (result.exit.reason, result.exit.code) == ("exit-port", exit_code)


# --- observation guests built for pv: what a PV kernel must not rely on ------------------------------------------
@pytest.mark.parametrize("guest, leak, exit_code", [
    ("flags", "after setup; pushf: eflags=00000246 IF=1 IOPL=0 -> DIFFERS", 0x24),   # pushf shows the real IF
    ("segments_read", "kernel takes the user-mode path -> DIFFERS", 0x31),           # CS has RPL 1, not 0
    ("store_tables", "sgdt: base=02000018 limit=ffff -> DIFFERS", 0x16),            # the hypervisor's GDT
    ("descriptors", "e019 ring-0 code: lar 00c0bb00, lsl ffffffff, verr 1, verw 0 -> DIFFERS", 0x44),  # Xen's DPL 1
])
def test_observation_guests_built_for_pv_show_what_still_leaks(guest, leak, exit_code):
    result = run_guest(load_guest(str(GUESTS / f"{guest}.s"), defines={"PV": 1}), monitor="pv")
    assert leak in result.console.splitlines()
    assert (result.exit.reason, result.exit.code) == ("exit-port", exit_code)


def test_a_trap_table_into_a_missing_code_segment_crashes_instead_of_triple_faulting():
    body = hypercall(0, 0, "traps") + "        cli\n"
    data = """
        .align 8
traps:  .byte 13, 0
        .word 0x08                      ; RPL 0 -> 0x09; no such descriptor (the guest has no GDT)
        .dword 0x100000
        .byte 8, 0
        .word 0x08
        .dword 0x100000
        .dword 0, 0
"""
    machine, result = run_pv(body, data)
    assert results(machine, 1) == [0]                            # Xen accepts it: a guest GDT selector
    assert result.exit.reason == "crash"
    assert result.exit.why.startswith("the trap table cannot take #GP at 0x100"), result.exit.why
    assert result.events["crash"] == {"domain": 1}


def test_run_command_options(capsys):
    from popek.cli import main
    assert main(["run", str(GUESTS / "kernel.s"), "-D", "PV", "--monitor", "pv"]) == 0
    out = capsys.readouterr().out
    assert "kernel: 2 checks, 0 differ" in out and "direct-trap: int 0x80 17" in out
    assert main(["run", str(GUESTS / "timer.s"), "--monitor", "pv"]) == 3     # a crashed domain: as a triple fault
    assert "exit: crash (lgdt at 0x100000: a PV kernel calls HYPERVISOR_set_gdt" in capsys.readouterr().out
    for bad in (["-D", "1x"], ["--monitor", "pv", "--ring", "1"], ["--cmdline", "x"]):
        assert main(["run", str(GUESTS / "hello.s"), *bad]) == 2


def test_every_pv_event_is_documented():
    from popek.events import undocumented
    for name in ("kernel", "critical_section", "pv/multicall", "pv/descriptors"):
        result = run_guest(load_guest(str(GUESTS / f"{name}.s"), defines={"PV": 1}), monitor="pv")
        assert undocumented(result.events) == [], name
    assert undocumented(run_guest(str(GUESTS / "timer.s"), monitor="pv").events) == []


def test_granted_port_io_traps_once_per_instruction_and_other_ports_fault():
    body = """
        mov esi, text
        mov ecx, 5
        mov dx, 0x3F8
        rep outsb
        mov al, 0x21
        out dx, al
""" + hypercall(0, 0, "traps") + "        mov al, 1\n        out 0x21, al\n"
    data = f"""
gp:     mov dword ptr [{RESULTS + 4}], 0x6060
        jmp finish
text:   .ascii "hello"
""" + GP_TRAP_TABLE
    machine, result = run_pv(body, data)
    assert result.console == "hello!"
    assert result.events["trap"] == {"out": 1, "outs": 1}
    assert results(machine, 2) == [0, 0x6060]


def test_rdpmc_at_ring_1_is_gp0_not_ud():
    """Unicorn raises #UD for rdpmc at every CPL; at CPL 1 with CR4.PCE = 0 the SDM says #GP(0)."""
    body = hypercall(0, 0, "traps") + "        rdpmc\n"
    data = f"""
gp:     mov eax, dword ptr [esp]
        mov dword ptr [{RESULTS + 4}], eax
        mov dword ptr [{RESULTS + 8}], 0x6060
        add dword ptr [esp + 4], 2
        add esp, 4
        iretd
ud:     mov dword ptr [{RESULTS + 8}], 0x0606
        add dword ptr [esp], 2
        iretd
        .align 8
traps:  .byte 13, 0
        .word 0xE019
        .dword gp
        .byte 6, 0
        .word 0xE019
        .dword ud
        .dword 0, 0
"""
    machine, result = run_pv(body, data)
    assert results(machine, 3) == [0, 0, 0x6060]
    assert result.events["reflect"] == {"#GP": 1}


def test_console_write_of_nothing_touches_no_memory_and_shutdown_takes_the_low_byte():
    body = hypercall(0, 18, 0, 0, 0x7FFFFFF0) + hypercall(1, 18, 0, 0, TOP) + """
        mov dword ptr [shutdown_reason], 0x105
"""
    machine, result = run_pv(body)
    assert results(machine, 2) == [0, 0]
    # Xen: domain_shutdown(d, (u8)reason): no -EINVAL, the reason's low byte
    assert result.exit.reason == "shutdown" and result.exit.code == 5


def test_a_cmdline_longer_than_start_info_holds_is_a_usage_error(tmp_path, capsys):
    from popek.cli import main
    guest = tmp_path / "g.s"
    guest.write_text("_start: hlt\n")
    assert main(["run", str(guest), "--monitor", "pv", "--cmdline", "x" * 1024]) == 2
    assert capsys.readouterr().err.strip().endswith("--cmdline is 1024 bytes; start_info holds at most 1023")
    assert main(["run", str(guest), "--monitor", "pv", "--cmdline", "x" * 1023]) != 2
