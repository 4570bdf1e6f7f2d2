"""The sun4v monitor against its contract (docs/sun4v.md): the fast-trap API with its status codes and
check order, real-address checks, hyperprivileged traps by instruction, what costs no hypervisor entry,
the unported-guest message; and ``popek domains``: channels, isolation, a crashing domain, waiting
domains, every configuration error as one line naming the file and line.

Each single-domain test assembles a small guest whose hypervisor-call results (%o0..%o3 = EBX, ECX, EDX,
ESI) go to ``RESULTS`` in guest memory, runs it under sun4v and reads them back.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from popek.asm import assemble_text
from popek.cli import main
from popek.machine.guest import Guest
from popek.machine.machine import Machine
from popek.monitors import run_guest
from popek.monitors.base import run
from popek.monitors.sun4v import Sun4v
from popek.monitors.sun4v import api as A
from popek.monitors.sun4v.domains import load_config, run_domains

ROOT = Path(__file__).resolve().parent.parent
GUESTS, DOMAINS = ROOT / "samples" / "guests", ROOT / "samples" / "domains"
RESULTS = 0x300000


def call(slot: int, fn: int, *args, trap: int = A.FAST_TRAP) -> str:
    """One hypervisor call with literal arguments; %o0..%o3 after it go to RESULTS + 16 * slot."""
    moves = "\n".join(f"        mov {r}, {a}" for r, a in zip(A.O_REGS, args))
    stores = "\n".join(f"        mov dword ptr [{RESULTS + 16 * slot + 4 * i}], {r}"
                       for i, r in enumerate(A.O_REGS[:4]))
    return f"{moves}\n        mov ebp, {fn}\n        int {trap:#x}\n{stores}\n"


EXIT = "        mov ebx, 0x1a5\n        mov ebp, 0\n        int 0x80\n        hlt\n"


def build(body: str, data: str = "") -> Guest:
    text = f'        .include "pm.inc"\n_start:\n{body}\n{EXIT}\n{data}\n        pm_data\n'
    program = assemble_text(text, defines={"SUN4V": 1}, include_dirs=(str(GUESTS),))
    return Guest("test", ((program.origin, bytes(program.image)),), program.entry, "asm", dict(program.symbols))


def execute(body: str, data: str = "", ram: int = 32 << 20, ops: Sun4v | None = None):
    machine = Machine(ram_size=ram)
    machine.load(build(body, data))
    result = run(machine, ops or Sun4v(), 1_000_000)
    return machine, result


def results(machine: Machine, slot: int) -> tuple[int, int, int, int]:
    return struct.unpack("<4I", machine.memory.read(RESULTS + 16 * slot, 16))


# --- the fast-trap API ---------------------------------------------------------------------------------------
def test_mach_exit_stops_the_domain_with_the_low_byte_of_o0():
    _machine, result = execute("")
    assert (result.exit.reason, result.exit.code) == ("mach-exit", 0xA5)
    assert result.events == {"hypercall": {"mach_exit": 1}}


def test_console_calls_and_their_status_codes():
    top = 32 << 20
    machine, result = execute(
        call(0, 0x61, 0x41) + call(1, 0x61, 0x100)
        + call(2, 0x63, "text", 3) + call(3, 0x63, top - 2, 4) + call(4, 0x63, 0xFFFFFFF0, 0x20)
        + call(5, 0x60) + call(6, 0x63, "text", 0),
        'text: .ascii "xyz"\n')
    assert result.console == "Axyz"
    assert results(machine, 0)[0] == A.EOK
    assert results(machine, 1)[0] == A.EINVAL                   # not a character
    assert results(machine, 2)[:2] == (A.EOK, 3)
    assert results(machine, 3)[0] == A.ENORADDR                 # runs past the domain's memory
    assert results(machine, 4)[0] == A.ENORADDR
    assert results(machine, 5)[0] == A.EWOULDBLOCK              # no console input
    assert results(machine, 6)[:2] == (A.EOK, 0)


def test_mach_desc_cpu_myid_tod_get():
    machine, result = execute(call(0, 0x01, "desc", 8) + call(1, 0x01, "desc", 200) + call(2, 0x16)
                              + call(3, 0x50) + call(4, 0x01, (32 << 20) - 4, 200), "desc: .space 200\n")
    text = b"domain primary\nvcpus 1\nmemory 0x2000000\n"
    assert results(machine, 0)[:2] == (A.EINVAL, len(text))    # too small: still the length
    assert results(machine, 1)[:2] == (A.EOK, len(text))
    assert machine.memory.read(machine.guest.symbols["desc"], len(text)) == text
    assert results(machine, 2)[:2] == (A.EOK, 0)
    status, seconds, *_ = results(machine, 3)
    assert status == A.EOK and A.TOD_EPOCH <= seconds <= A.TOD_EPOCH + 1
    assert results(machine, 4)[0] == A.ENORADDR


def test_bad_trap_numbers_and_hyper_fast_traps():
    machine, result = execute(call(0, 0x99) + call(1, 0x20) + call(2, 0, trap=0x83) + call(3, 0, trap=0x84)
                              + call(4, 0, trap=0x85) + call(5, 0, trap=0xFF))
    assert [results(machine, i)[0] for i in range(6)] == [A.EBADTRAP, A.EBADTRAP, A.ENOTSUPPORTED,
                                                         A.ENOTSUPPORTED, A.EBADTRAP, A.EBADTRAP]
    assert result.events["hypercall"] == {"bad-trap": 4, "mmu_map_addr": 1, "mmu_unmap_addr": 1, "mach_exit": 1}


def test_registers_eax_untouched_and_only_returns_change():
    machine, result = execute("        mov eax, 0x12345678\n        mov edi, 0x7777\n" + call(0, 0x16)
                              + "        mov dword ptr [0x300100], eax\n        mov dword ptr [0x300104], edi\n")
    assert struct.unpack("<II", machine.memory.read(0x300100, 8)) == (0x12345678, 0x7777)


def test_channels_in_a_single_domain_run_are_echannel():
    body = "".join(call(i, fn, 0, 0x200000, 8) for i, fn in enumerate(range(0xE0, 0xE8)))
    machine, _ = execute(body)
    assert [results(machine, i)[0] for i in range(8)] == [A.ECHANNEL] * 8


def test_int_0x80_from_ring_3_is_the_guests_own_system_call():
    # syscall.s (SUN4V build): ring 3 prints through its kernel's int 0x80 gate; only the console and the
    # exit reach the hypervisor.
    from popek.machine.guest import load_guest
    result = run_guest(load_guest(str(GUESTS / "syscall.s"), defines={"SUN4V": 1}), "sun4v")
    assert result.console == "ring 3 says hi\n"
    assert result.events["software-interrupt"] == {"int 0x80": 16}
    assert set(result.events["hypercall"]) == {"cons_putchar", "mach_exit"}


# --- hyperprivileged traps ---------------------------------------------------------------------------------
GP_HANDLER = """
gp:     inc dword ptr [0x300200]
        pop eax
        mov dword ptr [0x300204], eax               ; the error code
        add dword ptr [esp], 1                      ; the instructions tested are one byte long
        iretd
"""


def test_console_port_msr_and_memory_beyond_the_domain_fault_through_the_guests_idt():
    body = """
        pm_setup
        set_gate 13, gp, TRAPGATE
        mov dx, 0x3F8
        out dx, al                                  ; the console: hyperprivileged
        mov al, 0xFE
        out 0x21, al                                ; the strand's interrupt controller: the guest's own
        cli
        sti
        cli
        lidt [pm_idtr]
"""
    machine, result = execute(body, GP_HANDLER)
    assert struct.unpack("<II", machine.memory.read(0x300200, 8)) == (1, 0)
    assert result.events["hypertrap"] == {"out": 1}
    assert result.events["io"] == {"pic": 1}                    # no hypervisor entry for the PIC
    assert "exception" in result.events and set(result.events) <= {"hypercall", "hypertrap", "io", "exception",
                                                                   "sun4v"}


def test_rdmsr_and_memory_beyond_the_domain_are_hyperprivileged_traps():
    body = """
        pm_setup
        set_gate 13, gp2, TRAPGATE
        mov dword ptr [resume], after_msr
        rdmsr
after_msr:
        mov dword ptr [resume], after_read
        mov eax, dword ptr [0x01800000]             ; beyond a 16 MiB domain
after_read:
"""
    handler = """
gp2:    inc dword ptr [0x300200]
        add esp, 4
        push dword ptr [resume]
        pop dword ptr [esp]
        iretd
resume: .dword 0
"""
    machine, result = execute(body, handler, ram=16 << 20)
    assert machine.memory.u32(0x300200) == 2
    assert result.events["hypertrap"] == {"rdmsr": 1, "memory": 1}


def test_unported_guest_names_the_instruction_and_what_a_sun4v_kernel_calls():
    code = main(["run", str(GUESTS / "hello.s"), "--monitor", "sun4v", "--format", "json"])
    assert code == 3                                        # a triple fault, as popek run's exit status says
    result = run_guest(str(GUESTS / "hello.s"), "sun4v")
    assert result.exit.reason == "triple-fault"
    assert "first hyperprivileged trap: in 0x3fd at 0x100010" in result.exit.why
    assert "cons_putchar" in result.exit.why
    assert result.events["hypertrap"] == {"in": 1}


# --- domains -----------------------------------------------------------------------------------------------
def test_ping_pong_sample_exchanges_over_its_channel():
    outcome = run_domains(load_config(str(DOMAINS / "ping-pong.toml")), 1_000_000)
    primary, guest = outcome.results
    assert primary.console.splitlines()[4:] == [
        "primary: channel 0 is up", "primary: sent ping 1", "primary: got pong 1", "primary: sent ping 2",
        "primary: got pong 2", "primary: sent ping 3", "primary: got pong 3", "primary: done"]
    assert primary.console.startswith("domain primary\nvcpus 1\nmemory 0x2000000\nchannel 0 primary-ldg1 to ldg1\n")
    assert guest.console == ("ldg1: channel 0 is up\nldg1: got ping 1, answering\nldg1: got ping 2, answering\n"
                             "ldg1: got ping 3, answering\nldg1: done\n")
    assert [(r.exit.reason, r.exit.code) for r in outcome.results] == [("mach-exit", 0), ("mach-exit", 0)]
    doc = outcome.to_dict()
    assert set(doc) == {"schema", "chip", "domains", "channels"} and doc["chip"] == "T1"
    assert [d["domain"] for d in doc["domains"]] == ["primary", "ldg1"]
    assert doc["channels"] == [{"name": "primary-ldg1", "entries": 6}]
    assert "hypertrap" not in doc["domains"][0]["events"]


def test_domains_command_text_and_json(capsys):
    assert main(["domains", str(DOMAINS / "ping-pong.toml")]) == 0
    text = capsys.readouterr().out
    assert "== domain ldg1: strand 1, 16M of memory" in text and "Unicorn cannot run privileged SPARC" in text
    assert "channel primary-ldg1: primary#0 <-> ldg1#0, 6 entries copied" in text
    assert main(["domains", str(DOMAINS / "ping-pong.toml"), "--format", "json", "--slice", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["channels"][0]["entries"] == 6


def test_t1_full_sample_fills_32_strands():
    outcome = run_domains(load_config(str(DOMAINS / "t1-full.toml")), 100_000)
    assert len(outcome.results) == 32
    assert [r.console for r in outcome.results[:2]] == ["domain primary: vcpu 0\n", "domain ldg1: vcpu 0\n"]
    assert all(r.exit.reason == "mach-exit" for r in outcome.results)


def domains(tmp_path: Path, guests: dict[str, str], channel: bool = True, extra: str = "") -> Path:
    """A configuration of inline guests (assembled with -D SUN4V), one channel 0 between the first two."""
    parts = ['chip = "T1"']
    for name, body in guests.items():
        (tmp_path / f"{name}.s").write_text(f'        .include "{GUESTS}/pm.inc"\n_start:\n{body}\n{EXIT}\n'
                                            f'        pm_data\n')
        parts.append(f'[[domain]]\nname = "{name}"\nguest = "{name}.s"\nmemory = "16M"')
    if channel:
        a, b = list(guests)[:2]
        parts.append(f'[[channel]]\nname = "c"\nendpoints = [ {{ domain = "{a}", id = 0 }}, '
                     f'{{ domain = "{b}", id = 0 }} ]')
    path = tmp_path / "domains.toml"
    path.write_text("\n".join(parts) + "\n" + extra)
    return path


def two_domain_results(tmp_path, a: str, b: str = ""):
    outcome = run_domains(load_config(str(domains(tmp_path, {"a": a, "b": b}))), 1_000_000)
    return outcome


def slots(result_machine_memory, slot):
    return struct.unpack("<4I", result_machine_memory.read(RESULTS + 16 * slot, 16))


def test_ldc_bad_arguments_get_their_status_codes_in_the_api_order(tmp_path):
    body = (call(0, 0xE0, 0, 0x200040, 8)           # misaligned queue
            + call(1, 0xE0, 0, 0x200000, 3)         # 3 entries
            + call(2, 0xE0, 0, 0x200040, 3)         # both: EINVAL comes first
            + call(3, 0xE0, 0, 0x01000000, 8)       # beyond the 16M domain
            + call(4, 0xE0, 7, 0x200000, 8)         # not this domain's channel
            + call(5, 0xE0, 0, 0x200000, 8)         # fine
            + call(6, 0xE3, 0, 128)                 # tail forward by two entries
            + call(7, 0xE3, 0, 64)                  # backwards
            + call(8, 0xE3, 0, 0x1000)              # beyond the queue
            + call(9, 0xE3, 0, 200)                 # forward but not a multiple of 64
            + call(10, 0xE7, 0, 64)                 # no receive queue yet
            + call(11, 0xE1, 0)                     # tx qinfo
            + call(12, 0xE2, 0)                     # tx state: the peer has no queues: down
            + call(13, 0xE0, 0, 0x200000, 0))       # unconfigure
    outcome = run_domains(load_config(str(domains(tmp_path, {"a": body, "b": ""}))), 1_000_000)
    a = outcome.results[0]
    assert (a.exit.reason, a.exit.code) == ("mach-exit", 0xA5)
    machine = outcome.machines[0]
    statuses = [slots(machine.memory, i)[0] for i in range(14)]
    assert statuses == [A.EBADALIGN, A.EINVAL, A.EINVAL, A.ENORADDR, A.ECHANNEL, A.EOK, A.EOK, A.EINVAL,
                        A.EINVAL, A.EBADALIGN, A.EINVAL, A.EOK, A.EOK, A.EOK]
    assert slots(machine.memory, 11)[1:3] == (0x200000, 8)
    assert slots(machine.memory, 12)[1:] == (0, 128, A.CHANNEL_DOWN)


def test_isolation_memory_channels_and_exits(tmp_path):
    # a writes a marker at 0x400000 of its own memory, asks the hypervisor to print from beyond its
    # memory (ENORADDR), reads beyond it (#GP with no IDT: a triple fault ends only a); b, with a marker of
    # its own at the same real address, runs to its mach_exit and sees its own marker. (Beyond the 1 MiB of
    # read-only monitor memory above the domain's RAM, which holds the boot GDT: see docs/sun4v.md.)
    a = ("        mov dword ptr [0x400000], 0xAAAAAAAA\n" + call(0, 0x63, 0x01000000, 16)
         + "        mov eax, dword ptr [0x01200000]\n")
    b = ("        mov dword ptr [0x400000], 0xBBBBBBBB\n" + "        mov ecx, 20000\nspin: loop spin\n"
         + call(0, 0xE2, 1) + "        mov eax, dword ptr [0x400000]\n        mov dword ptr [0x300100], eax\n")
    outcome = run_domains(load_config(str(domains(tmp_path, {"a": a, "b": b}))), 1_000_000, slice_=100)
    ra, rb = outcome.results
    ma, mb = outcome.machines
    assert slots(ma.memory, 0)[0] == A.ENORADDR
    assert ra.exit.reason == "triple-fault" and ra.events["hypertrap"] == {"memory": 1}
    assert (rb.exit.reason, rb.exit.code) == ("mach-exit", 0xA5)            # a's crash did not stop b
    assert slots(mb.memory, 0)[0] == A.ECHANNEL                            # b has channel 0 only
    assert mb.memory.u32(0x300100) == 0xBBBBBBBB and ma.memory.u32(0x400000) == 0xAAAAAAAA


def test_domains_that_all_wait_end_and_say_why(tmp_path):
    wait = (call(0, 0xE0, 0, 0x200000, 8) + call(1, 0xE4, 0, 0x201000, 8)
            + "again:\n" + call(2, 0xE6, 0) + "        cmp ecx, edx\n        jne got\n        mov ebp, 0x12\n"
            "        int 0x80\n        jmp again\ngot:\n")
    outcome = run_domains(load_config(str(domains(tmp_path, {"a": wait, "b": wait}))), 1_000_000)
    for r in outcome.results:
        assert r.exit.reason == "hlt" and "every running domain waits" in r.exit.why


def test_a_domain_exiting_wakes_its_waiting_peer(tmp_path):
    wait = (call(0, 0xE0, 0, 0x200000, 8) + call(1, 0xE4, 0, 0x201000, 8)
            + "        mov ebp, 0x12\n        int 0x80\n" + call(2, 0xE2, 0))
    outcome = run_domains(load_config(str(domains(tmp_path, {"a": wait, "b": "        mov ecx, 5000\nl: loop l\n"}))),
                          1_000_000)
    ra, rb = outcome.results
    assert (ra.exit.reason, rb.exit.reason) == ("mach-exit", "mach-exit")
    assert slots(outcome.machines[0].memory, 2)[3] == A.CHANNEL_DOWN


# --- configuration errors: one line, FILE:LINE ------------------------------------------------------------
BAD_CONFIGS = [
    ('chip = "T1"\nbogus = 1\n[[domain]]\nname = "a"\nguest = "g.s"\n', 2, "unknown key 'bogus'"),
    ('chip = "T3"\n[[domain]]\nname = "a"\nguest = "g.s"\n', 1, "chip 'T3' is not modelled"),
    ('[[domain]]\nname = "a"\nguest = "g.s"\n[[domain]]\nname = "a"\nguest = "g.s"\n', 5, "duplicate domain name"),
    ('[[domain]]\nname = "a"\nguest = "g.s"\nvcpus = 2\n', 4, "SMP domains are not modelled"),
    ('[[domain]]\nname = "a"\nguest = "g.s"\nmemory = "lots"\n', 4, "not a size"),
    ('[[domain]]\nname = "a"\nguest = "g.s"\nmemory = "4G"\n', 4, "a multiple of 4K up to 3072M"),
    ('[[domain]]\nname = "a"\nguest = "missing.s"\n', 3, "guest 'missing.s' not found"),
    ('[[domain]]\nname = "a"\nguest = "g.s"\ncolour = "red"\n', 4, "unknown key 'colour' in a domain"),
    ('[[domain]]\nname = "a"\nguest = "g.s"\n[[channel]]\nname = "c"\n'
     'endpoints = [ { domain = "a", id = 0 }, { domain = "zz", id = 0 } ]\n', 6, "unknown domain 'zz'"),
    ('[[domain]]\nname = "a"\nguest = "g.s"\n[[channel]]\nname = "c"\n'
     'endpoints = [ { domain = "a", id = 0 }, { domain = "a", id = 1 } ]\n', 6, "both endpoints are in domain"),
    ('[[domain]]\nname = "a"\nguest = "g.s"\n[[channel]]\nname = "c"\nendpoints = [ { domain = "a" } ]\n', 6,
     "two endpoints"),
    ('[[domain]\nname = "a"\n', 1, "not TOML"),
    ('chip = "T1"\n', 1, "no [[domain]]"),
]


@pytest.mark.parametrize("text, line, message", BAD_CONFIGS, ids=[m for _, _, m in BAD_CONFIGS])
def test_bad_configuration_is_one_line_naming_the_line(tmp_path, capsys, text, line, message):
    (tmp_path / "g.s").write_text("_start:\n        hlt\n")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["domains", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"popek domains: error: {path}:{line}: ") and message in err, err
    assert len(err.splitlines()) == 1


def test_too_many_strands_and_too_much_memory(tmp_path, capsys):
    (tmp_path / "g.s").write_text("_start:\n        hlt\n")
    many = "".join(f'[[domain]]\nname = "d{i}"\nguest = "g.s"\nmemory = "4M"\n' for i in range(33))
    (tmp_path / "many.toml").write_text(many)
    assert main(["domains", str(tmp_path / "many.toml")]) == 2
    err = capsys.readouterr().err
    assert f"many.toml:{32 * 4 + 2}: domain 'd32': no strand left: the T1 has 32 strands" in err
    (tmp_path / "t2.toml").write_text('chip = "T2"\n' + many)
    big = "".join(f'[[domain]]\nname = "d{i}"\nguest = "g.s"\nmemory = "3G"\n' for i in range(11))
    (tmp_path / "big.toml").write_text(big)
    assert main(["domains", str(tmp_path / "big.toml")]) == 2
    assert "big.toml:44: domain 'd10': not enough memory left" in capsys.readouterr().err


def test_bad_command_line(capsys, tmp_path):
    assert main(["domains", str(DOMAINS / "ping-pong.toml"), "--slice", "0"]) == 2
    assert main(["domains", str(tmp_path / "none.toml")]) == 2
    assert main(["domains", str(DOMAINS / "ping-pong.toml"), "--profile", "nope"]) == 2
    assert all(line.startswith("popek domains: error: ") for line in capsys.readouterr().err.splitlines())


def test_cpu_yield_sleeps_until_the_strands_timer_fires():
    body = """
        plat_setup
        plat_timer tick, 1000
        sti
wait:
        mov ebp, 0x12                               ; cpu_yield
        int 0x80
        cmp dword ptr [ticks], 3
        jb wait
        cli
        mov ebx, dword ptr [ticks]
        mov ebp, 0
        int 0x80
"""
    handler = """
ticks:  .dword 0
tick:   inc dword ptr [ticks]
        push eax
        irq_eoi
        pop eax
        kiret
"""
    machine, result = execute(body, handler)
    assert (result.exit.reason, result.exit.code) == ("mach-exit", 3)
    assert result.events["idle"]["clocks"] > 2000             # the strand slept, it did not spin
    assert result.events["hypercall"]["cpu_yield"] <= 4
    assert "hypertrap" not in result.events                 # the PIC and PIT are the strand's own


def test_cpu_yield_with_nothing_to_wake_it_ends_the_run():
    _machine, result = execute(call(0, 0x12) + call(1, 0x12))
    assert result.exit.reason == "hlt" and "nothing can wake the strand" in result.exit.why


def test_options_of_other_monitors_do_not_apply(capsys):
    assert main(["run", str(GUESTS / "hello.s"), "--monitor", "sun4v", "--ring", "1"]) == 2
    assert "--ring does not apply to monitor 'sun4v'" in capsys.readouterr().err


# Every instruction of the ISA description's `model sun4v` trap lines, executed once at CPL 0: the
# hypervisor counts it by name, and the guest gets the fault the model says (#GP(0), or #UD as natively).
TRAPPING = {
    "in": ("ec", 13), "out": ("ee", 13), "ins": ("6c", 13), "outs": ("6e", 13), "rdmsr": ("0f32", 13),
    "wrmsr": ("0f30", 13), "sysenter": ("0f34", 13), "wbinvd": ("0f09", 13), "invd": ("0f08", 13),
    "wbnoinvd": ("f30f09", 13), "syscall": ("0f05", 6), "swapgs": ("0f01f8", 6), "rsm": ("0faa", 6),
    "vmx": ("0f01c4", 6), "vmcall": ("0f01c1", 6), "svm": ("0f01d8", 6), "vmmcall": ("0f01d9", 6),
}


def test_the_trap_lines_of_the_sun4v_model_are_what_the_monitor_traps():
    from popek.isa.language import bundled
    assert set(TRAPPING) == set(bundled().model("sun4v").traps)
    for name, (code, vector) in TRAPPING.items():
        body = f"""
        pm_setup
        set_gate 6, fault, TRAPGATE
        set_gate 13, fault_err, TRAPGATE
        mov dx, 0x3F8
        mov edi, 0x300400
        mov esi, 0x300400
        mov dword ptr [resume], after
        .byte {", ".join("0x" + code[i:i + 2] for i in range(0, len(code), 2))}
after:
"""
        handler = """
fault_err:
        add esp, 4
fault:  mov dword ptr [0x300300], 1
        push dword ptr [resume]
        pop dword ptr [esp]
        iretd
resume: .dword 0
"""
        machine, result = execute(body, handler)
        assert result.events.get("hypertrap") == {name: 1}, (name, result.events)
        assert result.events["exception"] == {"#GP" if vector == 13 else "#UD": 1}, (name, result.events)


def test_every_event_is_in_the_vocabulary_and_priced_on_the_t1_profile():
    from popek.events import undocumented
    from popek.machine.guest import load_guest
    outcome = run_domains(load_config(str(DOMAINS / "ping-pong.toml")), 1_000_000)
    runs = list(outcome.results) + [run_guest(str(GUESTS / "hello.s"), "sun4v", profile="ultrasparc-t1"),
                                    run_guest(load_guest(str(GUESTS / "kernel.s"), defines={"SUN4V": 1}), "sun4v",
                                              profile="ultrasparc-t1")]
    for result in runs:
        assert undocumented(result.events) == [], result.events
        assert result.profile["unpriced"] == [], result.profile


def test_compare_runs_the_sun4v_build_and_shows_no_trap_for_the_timer():
    from popek.experiments.compare import compare
    comparison = compare([str(GUESTS / "timer.s")], ("sun4v",), profile="ultrasparc-t1")
    native, sun4v = comparison.cells
    assert (sun4v.monitor, sun4v.status, sun4v.exit) == ("sun4v", "equivalent", "mach-exit 10")
    assert sun4v.work == {"hypercall": 3}                    # two console calls and mach_exit: no tick, no cli


def test_a_guest_that_does_not_fit_or_does_not_assemble_names_the_line(tmp_path, capsys):
    (tmp_path / "big.s").write_text("_start:\n        hlt\n        .org 0x200000\n        .byte 1\n")
    (tmp_path / "bad.s").write_text("_start:\n        frobnicate eax\n")
    for guest, message in (("big.s", "do not fit"), ("bad.s", "bad.s")):
        path = tmp_path / f"{guest}.toml"
        path.write_text(f'[[domain]]\nname = "a"\nguest = "{guest}"\nmemory = "1M"\n')
        assert main(["domains", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"popek domains: error: {path}:3: domain 'a': ") and message in err, err
        assert len(err.splitlines()) == 1
