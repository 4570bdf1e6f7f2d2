"""bt: binary translation (popek.monitors.bt) against the bare machine.

Every sample guest runs under ``bt`` with the same console, exit code, visible state, guest RAM (so no
cache address is left anywhere in guest memory) and instruction count as natively. The rest checks what
equivalence alone would not show: the generated code decodes as intended, faults are reported at guest
addresses, nothing the guest can see holds a cache address, the cache can be neither read nor written nor
jumped into, stores into code invalidate exactly what they overlap, the cache stays bounded, interrupts
land after the same guest instruction as natively, and ``direct_user`` leaks what the default hides.
"""
from __future__ import annotations

import functools
from pathlib import Path

import capstone
import pytest

from popek.asm import assemble_text
from popek.cli import main
from popek.machine import Guest, Machine, load_guest
from popek.monitors import get_monitor, run_guest
from popek.monitors import bt_emit as emit
from popek.monitors.base import run

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "samples" / "guests"
SAMPLES = sorted(p.name for p in GUESTS.glob("*.s"))


def build(body: str, name: str = "guest") -> Guest:
    program = assemble_text('        .include "pm.inc"\n_start:\n' + body, name=name, include_dirs=[GUESTS])
    return Guest(name, ((program.origin, program.image),), program.entry, "asm", program.symbols)


def machine_run(guest: Guest, monitor: str, budget: int = 10_000_000, **options):
    m = Machine()
    m.load(guest)
    ops = get_monitor(monitor, **options)
    return run(m, ops, budget), m, ops


def same(a, b, instructions: bool = True) -> None:
    assert (a.console, a.exit) == (b.console, b.exit)
    assert a.state == b.state
    if instructions:
        assert a.guest_instructions == b.guest_instructions


@functools.lru_cache(maxsize=None)
def native(name: str):
    result, m, _ops = machine_run(load_guest(str(GUESTS / name)), "native")
    return result, bytes(m.uc.mem_read(0, 0x400000))


# --- the generated code ------------------------------------------------------------------------------------
def decode(code: bytes, at: int) -> list[str]:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    return [f"{i.mnemonic} {i.op_str}".strip() for i in md.disasm(code, at)]


def test_encodings_decode_as_intended():
    at = 0x2100000
    assert decode(emit.jmp(at, at + 0x1234), at) == [f"jmp {at + 0x1234:#x}"]
    assert decode(emit.jcc(at, 5, at - 16), at) == [f"jne {at - 16:#x}"]
    assert decode(emit.push_imm(0x100123), at) == ["push 0x100123"]
    assert decode(emit.lea_ecx(-0x100000), at) == ["lea ecx, [ecx - 0x100000]"]
    assert decode(emit.lea_esp(8), at) == ["lea esp, [esp + 8]"]
    assert decode(emit.jecxz(at, at + 9), at) == [f"jecxz {at + 9:#x}"]
    assert decode(emit.XCHG_ECX_TOP + emit.POP_ECX + emit.DEC_ECX + emit.SYSCALL + emit.INT_CONTINUE, at) == [
        "xchg dword ptr [esp], ecx", "pop ecx", "lea ecx, [ecx - 1]", "syscall", f"int {emit.CONTINUE_VECTOR:#x}"]
    # push r/m32 from the operand of jmp [ebx + esi*4 + 8] and call dword ptr fs:[eax]
    assert decode(emit.push_rm(bytes.fromhex("ff64b308"), 0), at) == ["push dword ptr [ebx + esi*4 + 8]"]
    assert decode(emit.push_rm(bytes.fromhex("64ff10"), 1), at) == ["push dword ptr fs:[eax]"]


def test_a_lookup_block_compares_guest_targets_and_jumps_to_their_translations():
    at = 0x2300000
    layout = emit.Lookup("ret", 2, release=8)
    text = decode(layout.code(at, [(0x100010, 0x2100040)]), at)
    assert text[:4] == ["xchg dword ptr [esp], ecx", "lea ecx, [ecx - 0x100010]",
                        f"jecxz {at + layout.hits_at:#x}", "lea ecx, [ecx + 0x100010]"]
    assert text[4] == f"jmp {at + layout.miss_at:#x}"          # the empty way
    hit = decode(layout.code(at, [(0x100010, 0x2100040)])[layout.hits_at:], at + layout.hits_at)
    assert hit[:4] == ["pop ecx", "mov dword ptr [esp - 4], 0x100010", "lea esp, [esp + 8]", "jmp 0x2100040"]
    call = emit.Lookup("call", 1, prologue=emit.push_rm(bytes.fromhex("ffd0"), 0), ret_to=0x100200)
    hit = decode(call.code(at, [(1, 2)])[call.hits_at:], at + call.hits_at)
    assert hit[:3] == ["pop ecx", "push 0x100200", "jmp 2"]
    assert decode(call.code(at, [])[:2], at) == ["push eax"]


# --- equivalence -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLES)
def test_sample_guest_runs_as_natively(name):
    reference, ram = native(name)
    # paranoid: at every callout, no guest register and no word on top of the guest's stack is a cache address
    result, m, ops = machine_run(load_guest(str(GUESTS / name)), "bt", paranoid=True)
    same(reference, result)
    assert bytes(m.uc.mem_read(0, 0x400000)) == ram           # guest memory too (accessed bits, stacks...)
    assert result.events["translation"]["runs"] > 0
    assert result.exit.reason == "exit-port" and result.exit.code is not None


def test_a_store_into_the_running_block_counts_once_under_both():
    # Unicorn reruns a store into the translation block it runs in; the machine takes the rerun off the
    # count (popek.machine.selfmod), and bt, which runs the guest from its cache, never has one.
    path = str(ROOT / "tests" / "regressions" / "smc-store-counted-twice.s")
    reference = run_guest(path, "native")
    result = run_guest(path, "bt")
    same(reference, result)
    assert result.guest_instructions == 4 and result.events["invalidation"]["guest-write"] >= 1
    assert reference.events["corrected"]["smc-rerun"] == 1


def test_events_name_what_the_monitor_did():
    result = run_guest(str(GUESTS / "kernel.s"), "bt")
    ev = result.events
    assert ev["translation"]["instructions"] > 0 and ev["translation"]["cache-bytes"] > 0
    for name in ("lgdt", "lidt", "ltr", "out", "iret", "int", "sti", "hlt", "pushf", "popf", "mov_from_seg"):
        assert ev["callout"][name] > 0, name
    assert ev["chain"]["patched"] > 0 and ev["lookup"]["filled"] > 0 and ev["lookup"]["hit"] > 0
    assert ev["external-interrupt"]["vector 0x20"] > 0


# --- interrupts land after the same guest instruction ----------------------------------------------------
TIMER_LOOP = """
        pm_setup
        set_gate 0x20, irq0, INTGATE
        mov al, 0x11
        out 0x20, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x04
        out 0x21, al
        mov al, 0x01
        out 0x21, al
        mov al, 0xFE
        out 0x21, al
        mov al, 0x34
        out 0x43, al
        mov al, 97
        out 0x40, al
        mov al, 0
        out 0x40, al
        xor ebx, ebx
        xor esi, esi
        mov edi, table
        sti
again:
        call leaf                       ; traced call and return
        call dword ptr [edi]            ; indirect call through a table
        mov eax, dword ptr [edi + 4]
        call eax                        ; indirect call through a register
        loop_inner:
        inc esi
        cmp ebx, 40
        jb again
        cli
        mov eax, esi
        exit 0
leaf:   add esi, 2
        ret
other:  xor esi, 5
        ret 0
third:  lea esi, [esi + 3]
        ret
irq0:
        inc ebx
        push eax
        mov al, 0x20
        out 0x20, al
        mov eax, dword ptr [esp + 4]    ; the interrupted EIP: a guest address
        mov dword ptr [last_eip], eax
        pop eax
        iretd
        .align 4
table:  .dword other, third
last_eip: .dword 0
        pm_data
"""


def test_timer_interrupts_land_after_the_same_guest_instruction():
    guest = build(TIMER_LOOP)
    reference, mn, _ = machine_run(guest, "native")
    result, mb, _ = machine_run(guest, "bt", paranoid=True)
    same(reference, result)
    assert result.events["external-interrupt"]["vector 0x20"] == reference.events["external-interrupt"]["vector 0x20"]
    last = guest.symbols["last_eip"]
    assert mn.memory.u32(last) == mb.memory.u32(last) and mb.memory.u32(last) < 0x200000


# --- precise faults -------------------------------------------------------------------------------------------
FAULTS = """
        pm_setup
        set_gate 0, on_de, INTGATE
        set_gate 13, on_gp, INTGATE
        set_gate 0x80, done, USERGATE
        mov ecx, 7
        xor edx, edx
        xor eax, eax
        inc eax
        inc eax
div_here:
        div edx                         ; #DE in the middle of a unit
        inc eax
back1:
        enter_ring3 user                ; faults from ring 3 switch to the TSS stack
user:
        mov esp, 0xFFFFFFF0             ; a stack outside memory: the return's first glue instruction faults
ret_here:
        ret
user2:
        mov esp, 0xFFFFFFF0             ; a call whose push faults
call_here:
        call f
user3:
        int 0x80
f:      ret
done:
        exit 0
on_de:
        mov eax, dword ptr [esp]
        mov dword ptr [de_eip], eax
        mov dword ptr [esp], back1
        iretd
on_gp:
        push eax
        mov eax, dword ptr [gp_count]
        inc dword ptr [gp_count]
        push ebx
        mov ebx, dword ptr [esp + 12]   ; the faulting EIP (above: ebx, eax, error code)
        mov dword ptr [gp_eip + eax * 4], ebx
        pop ebx
        cmp eax, 0
        jne second
        mov dword ptr [esp + 8], user2
        jmp out
second:
        mov dword ptr [esp + 8], user3
out:
        mov dword ptr [esp + 20], USTACK    ; ring-3 ESP in the frame: usable again
        pop eax
        add esp, 4
        iretd
        .align 4
de_eip: .dword 0
gp_count: .dword 0
gp_eip: .dword 0, 0
        pm_data
"""


def test_faults_are_reported_at_the_guest_instruction():
    guest = build(FAULTS)
    reference, mn, _ = machine_run(guest, "native")
    result, mb, _ = machine_run(guest, "bt", paranoid=True)
    same(reference, result)
    assert mb.memory.u32(guest.symbols["de_eip"]) == guest.symbols["div_here"]
    assert mb.memory.u32(guest.symbols["gp_eip"]) == guest.symbols["ret_here"]
    assert mb.memory.u32(guest.symbols["gp_eip"] + 4) == guest.symbols["call_here"]
    assert result.events["exception"] == reference.events["exception"] == {"#DE": 1, "#GP": 2}


# --- resource control ---------------------------------------------------------------------------------------
PROBES = """
        pm_setup
        set_gate 13, on_gp, INTGATE
        mov dword ptr [resume], r1
        mov eax, dword ptr [CACHE + 0x40]       ; read
r1:     mov dword ptr [resume], r2
        mov dword ptr [CACHE + 0x40], eax       ; write
r2:     mov dword ptr [resume], r3
        mov esi, CACHE + 0x40
        lodsd                                   ; read through a string instruction
r3:     mov dword ptr [resume], r4
        mov eax, CACHE + 0x10
        jmp eax                                 ; jump into it
r4:     exit 0
on_gp:
        mov eax, dword ptr [esp]                ; error code
        mov ebx, dword ptr [count]
        mov dword ptr [codes + ebx * 4], eax
        mov eax, dword ptr [esp + 4]            ; faulting EIP
        mov dword ptr [eips + ebx * 4], eax
        inc dword ptr [count]
        add esp, 4
        mov eax, dword ptr [resume]
        mov dword ptr [esp], eax
        iretd
        .align 4
resume: .dword 0
count:  .dword 0
codes:  .space 16
eips:   .space 16
        pm_data
"""


def test_the_cache_cannot_be_read_written_or_jumped_into():
    m = Machine()
    cache_base = ((m.memory.monitor_end + 0xFFF) & ~0xFFF) + 0x1000    # where bt maps it, past a guard page (see bt_cache)
    guest = build(f"        .equ CACHE, {cache_base:#x}\n" + PROBES)
    reference, mn, _ = machine_run(guest, "native")
    result, mb, ops = machine_run(guest, "bt")
    assert ops.cache.base == cache_base
    same(reference, result)
    n = mb.memory.u32(guest.symbols["count"])
    assert n == 4 and mn.memory.u32(guest.symbols["count"]) == 4
    eips = [mb.memory.u32(guest.symbols["eips"] + 4 * i) for i in range(4)]
    assert eips[3] == cache_base + 0x10             # the jump's target: the fetch faults there, as natively
    assert eips[:3] == [mn.memory.u32(guest.symbols["eips"] + 4 * i) for i in range(3)]
    assert result.events["resource"]["cache-reads"] == 2
    assert ops.cache.read(ops.cache.units_start, 1) == emit.HLT    # the cache bytes are intact


# --- self-modifying code --------------------------------------------------------------------------------------
SMC = """
        pm_setup
        mov ecx, 1000
data_loop:
        add dword ptr [counter], 1              ; data right beside the code, inside the watched range
        loop data_loop
        call f
        mov byte ptr [f + 1], 9                 ; one byte of f
        call f
        exit 0
f:      mov bl, 1
        ret
counter: .dword 0
        pm_data
"""


def test_stores_invalidate_exactly_the_translations_they_overlap():
    guest = build(SMC)
    reference, _, _ = machine_run(guest, "native")
    result, _, ops = machine_run(guest, "bt")
    same(reference, result, instructions=False)
    assert result.state["ebx"] & 0xFF == 9
    invalidated = result.events["invalidation"]["guest-write"]
    # the 1000 data stores invalidated nothing; the store into f, the translations of f (a traced copy in
    # the caller's run, the one after the loop, and f's own)
    assert 1 <= invalidated <= 3


def test_a_frame_pushed_over_translated_code_invalidates_it():
    # As in tests/test_machine.py: x runs (and is translated), then the monitor pushes a #GP frame over it
    # (a host write, not a guest store); its error code 0xF4F4 is `hlt; hlt`. Stale code would exit with 7.
    guest = build("""
        pm_setup
        set_gate 13, gp, INTGATE
        call x
        mov esp, x + 16
        mov ax, 0xF4F4
        mov ds, ax
gp:
        jmp x
        .align 16
x:
        inc ebx
        cmp ebx, 2
        je stale
        ret
stale:
        exit 7
        pm_data
""")
    reference, _, _ = machine_run(guest, "native")
    result, _, _ = machine_run(guest, "bt")
    same(reference, result)
    assert result.exit.reason == "hlt" and result.events["invalidation"]["host-write"] >= 1


# --- bounded cache ------------------------------------------------------------------------------------------
def many_pages(pages: int, rounds: int) -> Guest:
    """A loop calling ``pages`` functions, each in a page of its own, ``rounds`` times."""
    calls = "".join(f"        call f{i}\n" for i in range(pages))
    funcs = "".join(f"        .align 4096\nf{i}:\n" + "        add eax, ecx\n        rol eax, 3\n" * 12
                    + "        ret\n" for i in range(pages))
    return build(f"        mov ecx, {rounds}\nround:\n{calls}        dec ecx\n        jnz round\n"
                 f"        exit 0\n{funcs}        pm_data\n")


def test_a_small_cache_is_flushed_and_the_guest_still_runs_as_natively():
    guest = many_pages(100, 10)
    reference, _, _ = machine_run(guest, "native")
    result, _, ops = machine_run(guest, "bt", cache_size=0x1000)
    same(reference, result)
    assert result.events["flush"]["cache-full"] >= 10
    units, glue = ops.cache.used()
    assert units <= 0x1000 and glue <= 0x1000 and ops.cache.end - ops.cache.base == 0x2000


# --- user code: translated by default, direct with direct_user --------------------------------------------
def test_user_mode_sensitive_instructions_leak_only_with_direct_user(capsys):
    path = str(GUESTS / "bt_redpill.s")
    reference, _ = native("bt_redpill.s")
    default = run_guest(path, "bt")
    direct = run_guest(path, "bt", direct_user=True)
    same(reference, default)
    lines = direct.console.splitlines()
    assert lines[:4] == reference.console.splitlines()[:4]          # the kernel's lines: translated
    assert "DIFFERS" in lines[4] and "DIFFERS" in lines[5]          # ring 3 reads the monitor's tables
    assert direct.exit.code == 0xC2
    assert main(["diff", path, "--monitor", "bt"]) == 0
    capsys.readouterr()
    assert main(["diff", path, "--monitor", "bt", "--direct-user"]) == 1
    out = capsys.readouterr().out
    assert "sidt at" in out and "sgdt at" in out


def test_direct_user_is_a_bt_option_only(capsys):
    assert main(["run", str(GUESTS / "hello.s"), "--direct-user"]) == 2
    assert "--direct-user does not apply" in capsys.readouterr().err
    assert main(["run", str(GUESTS / "hello.s"), "--monitor", "bt", "--direct-user"]) == 0


# --- the machine's instruction counter ----------------------------------------------------------------------
def test_glue_is_not_counted_as_guest_instructions():
    guest = build("""
        mov ecx, 500
again:  call f                          ; call and return glue, not counted
        loop again                      ; loop glue
        exit 0
f:      ret
        pm_data
""")
    reference, _, _ = machine_run(guest, "native")
    for budget in (1, 2, 3, 17, 401, 1000):     # a budget ends a run after exactly that many guest instructions
        a, _, _ = machine_run(guest, "native", budget)
        b, _, _ = machine_run(guest, "bt", budget)
        assert (a.state, a.guest_instructions) == (b.state, b.guest_instructions), budget
    result, _, _ = machine_run(guest, "bt")
    same(reference, result)


# --- a guest that pages -----------------------------------------------------------------------------------
def test_a_paging_guest_runs_and_a_store_through_an_alias_invalidates_code():
    guest = build("""
        pm_setup
        set_gate 14, pf, INTGATE
        mov edi, 0x301000               ; identity map of 0-4 MiB
        mov eax, 0x003
        mov ecx, 1024
fill:
        mov dword ptr [edi], eax
        add eax, 0x1000
        add edi, 4
        loop fill
        mov eax, f                      ; linear 0x400000 -> the physical page of f
        and eax, 0xFFFFF000
        or eax, 3
        mov dword ptr [0x302000], eax
        mov dword ptr [0x300000], 0x301003
        mov dword ptr [0x300004], 0x302003
        mov eax, 0x300000
        mov cr3, eax
        mov eax, cr0
        or eax, 0x80000000
        mov cr0, eax
        call f
        mov esi, ebx
        mov eax, f
        and eax, 0xFFF
        mov byte ptr [0x400000 + eax + 1], 5    ; f's immediate, through the alias
        call f
        mov dword ptr [0x800000], 1     ; #PF: not present
pf:
        mov ecx, cr2
        exit 14
f:      mov bl, 3
        ret
        pm_data
""")
    reference, _, _ = machine_run(guest, "native")
    result, _, _ = machine_run(guest, "bt")
    same(reference, result)
    assert (result.exit.code, result.state["esi"] & 0xFF, result.state["ebx"] & 0xFF) == (14, 3, 5)
    assert result.state["ecx"] == result.state["cr2"] == 0x800000
    assert result.events["invalidation"]["guest-write"] >= 1


def test_user_port_io_follows_the_guests_tss_bitmap_translated_or_direct():
    # The guest's TSS allows ports 0x3F8-0x3FF to ring 3; the real TR is the monitor's TSS (no bitmap).
    guest = build("""
        pm_setup
        set_gate 13, gp, INTGATE
        mov eax, big_tss
        mov word ptr [pm_gdt + TSSSEL + 2], ax
        shr eax, 16
        mov byte ptr [pm_gdt + TSSSEL + 4], al
        mov byte ptr [pm_gdt + TSSSEL + 7], ah
        mov word ptr [pm_gdt + TSSSEL], big_tss_end - big_tss - 1
        mov byte ptr [pm_gdt + TSSSEL + 5], 0x89
        mov dword ptr [big_tss + 4], KSTACK
        mov dword ptr [big_tss + 8], KDATA
        mov word ptr [big_tss + 102], 104
        mov ax, TSSSEL
        ltr ax
        enter_ring3 user
user:
        mov al, 'C'
        mov dx, 0x3F8
        out dx, al
        mov esi, text
        mov ecx, 2
        rep outsb                       ; string I/O at ring 3
        mov dx, 0x3FD
        in al, dx
        mov bl, al
        mov al, 0
denied:
        out 0xF4, al
gp:
        mov ecx, dword ptr [esp + 4]
        exit 13
text:   .ascii "ok"
        pm_data
        .align 4
big_tss:
        .space 104
        .space 0x3F8 / 8, 0xFF
        .byte 0
        .space 8192 - 0x3F8 / 8 - 1, 0xFF
        .byte 0xFF
big_tss_end:
""")
    reference, _, _ = machine_run(guest, "native")
    assert (reference.console, reference.exit.code) == ("Cok", 13)
    for options in ({}, {"direct_user": True}):
        result, _, _ = machine_run(guest, "bt", **options)
        same(reference, result, instructions=not options)


V86_IRET = """
_start:
        push 0                          ; gs, fs, ds, es
        push 0
        push 0
        push 0
        push 0x9000                     ; ss
        mov eax, 0xfffe
        push eax                        ; sp
        push 0x20002                    ; eflags with VM: the iret enters virtual-8086 mode
        push 0x1000                     ; cs
        push 0                          ; ip
        iretd
"""


def test_iret_to_virtual_8086_mode_ends_the_run_unsupported(tmp_path, capsys):
    # bt does not model virtual-8086 mode: it stops there, saying so, instead of giving the guest a #GP
    # the CPU would not raise (a silent divergence; bench images, image 139). Natively the guest runs on.
    path = tmp_path / "v86.s"
    path.write_text(V86_IRET)
    native, result = run_guest(str(path), "native", 1000), run_guest(str(path), "bt", 1000)
    assert native.exit.reason == "budget"
    assert result.exit.reason == "unsupported" and "virtual-8086" in result.exit.why and not result.finished
    assert main(["run", str(path), "--monitor", "bt"]) == 5
    assert "unsupported (bt: iret to virtual-8086 mode is not modelled)" in capsys.readouterr().out


def test_a_guest_that_sets_tf_is_single_stepped_as_natively(tmp_path):
    # With TF in the real flags Unicorn would single-step the cache's glue, not the guest (bench images,
    # image 379: #DB one instruction early); bt keeps TF virtual and makes the traps itself
    path = tmp_path / "tf.s"
    path.write_text("_start:\n pushfd\n or dword ptr [esp], 0x100\n popfd\n nop\n out 0xf4, al\n")
    native, result = run_guest(str(path), "native"), run_guest(str(path), "bt")
    assert native.exit.reason == "triple-fault" and native.guest_instructions == 4   # #DB after the nop
    assert (result.exit.reason, result.guest_instructions, result.state["eip"]) == \
        (native.exit.reason, 4, native.state["eip"])


def test_sysexit_through_a_gdt_without_its_flat_descriptors_runs_as_natively(tmp_path):
    # sysexit loads flat ring-3 segments without reading the GDT (the boot GDT has none at 0x18 and 0x20).
    # Copied into the cache it raised #GP at the real ring; then bt's routine loaded the GDT's descriptors and
    # ended the run unsupported; now it loads the flat segments as the CPU does (bt's rings are not compressed).
    path = tmp_path / "sysexit.s"
    path.write_text("_start:\n mov ecx, 0x174\n mov eax, 0x8\n xor edx, edx\n wrmsr\n mov edx, user\n"
                    " mov ecx, 0x80000\n sysexit\nuser:\n out 0xf4, al\n")
    native, result = run_guest(str(path), "native"), run_guest(str(path), "bt")
    assert native.exit.reason == "triple-fault" and native.state["cpl"] == 3     # the out at ring 3
    assert (result.exit, result.guest_instructions) == (native.exit, native.guest_instructions)
    assert {k: result.state[k] for k in ("cpl", "cs", "ss", "esp", "eip")} == \
        {k: native.state[k] for k in ("cpl", "cs", "ss", "esp", "eip")}


@pytest.mark.parametrize("monitor", ("bt", "trap"))
def test_cr4_osxsave_reaches_the_real_cpu(tmp_path, monitor):
    # the real CR4 did not follow the guest's OSXSAVE: xgetbv (and xsave, xsetbv) raised #UD under bt and
    # trap, where natively they run (a review)
    path = tmp_path / "xgetbv.s"
    path.write_text("_start:\n mov eax, cr4\n or eax, 0x40000\n mov cr4, eax\n xor ecx, ecx\n xgetbv\n"
                    " mov ebx, eax\n mov eax, 0\n out 0xf4, al\n")
    native, result = run_guest(str(path), "native"), run_guest(str(path), monitor)
    assert (result.exit.reason, result.exit.code) == (native.exit.reason, native.exit.code) == ("exit-port", 0)
    assert result.state["ebx"] == native.state["ebx"]
