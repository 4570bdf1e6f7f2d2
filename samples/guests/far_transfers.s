; far_transfers.s: far JMP, CALL and RET through code segments and a call gate, INT n through gates of
; DPL 0 and DPL 3, and IRET (Robin & Irvine: CALL, JMP, RET, INT n reference the protection system).
; At each landing the guest records CS (its RPL is the new CPL), ESP and the frame the transfer pushed,
; and prints them; a #GP handler (probe_gp) records error codes and resumes after the instruction.
;
; Why it matters: the privilege checks of a far transfer compare the target's DPL with the CPL, and the
; stack switch reads the TSS for the new CPL. None of these instructions is privileged. A kernel
; deprivileged to ring 3 finds its own ring-0 code unreachable by far jmp/call (#GP), its same-ring calls
; turned into ring changes or its call gate crossing rings it did not cross, and its frames holding RPL-3
; selectors; the ring-3 part then runs against a monitor's idea of ring 0. Predicted under
; trap-and-emulate: the first line differs ("jmp far 0008" faults or lands with RPL 3), and the kernel
; lines after it; the ring-3 lines whose answer is a #GP stay ok if the monitor reflects the fault.
;
; Layout: the GDT of pm.inc plus two call gates, 0x40 (DPL 0) and 0x48 (DPL 3), both to ring-0 code.
; IDT: 0x41 and 0x81 DPL-0 interrupt gates, 0x82 DPL-3 trap gate (all land in ring 0), 0x80 the ring-3 printing
; service, 0x86 the ring-3 "report" service, 0x87 the end. Every case starts from a fixed stack pointer,
; KSP (ring 0) or USTACK (ring 3), so the expected ESP values are constants.
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 6
        .equ GATE0,    0x40
        .equ GATE3,    0x48 | 3
        .equ KSP,      KSTACK - 0x100   ; the kernel's cases start here (the TSS esp0 stays KSTACK)
        .equ NO_FAULT, 0xFFFFFFFF
        .equ NONE,     0                ; frame layouts for report
        .equ RET,      1                ; eip, cs
        .equ RET_CALL_OUTER, 2          ; eip, cs, esp, ss (far call through a gate to an inner ring)
        .equ RET_INT_OUTER,  3          ; eip, cs, eflags, esp, ss (int n to an inner ring)

; start RESUME: a fresh case: nothing landed yet, the #GP probe resumes at RESUME.
        .macro start resume
        mov dword ptr [land_cs], 0xFFFFFFFF
        probe_arm \resume
        .endm

; land: record CS, ESP and five stack words at a landing (DS must be usable).
        .macro land
        mov dword ptr [land_esp], esp
        push eax
        mov eax, cs
        and eax, 0xFFFF
        mov dword ptr [land_cs], eax
        mov eax, dword ptr [esp + 4]
        mov dword ptr [land_frame], eax
        mov eax, dword ptr [esp + 8]
        mov dword ptr [land_frame + 4], eax
        mov eax, dword ptr [esp + 12]
        mov dword ptr [land_frame + 8], eax
        mov eax, dword ptr [esp + 16]
        mov dword ptr [land_frame + 12], eax
        mov eax, dword ptr [esp + 20]
        mov dword ptr [land_frame + 16], eax
        pop eax
        .endm

; check "NAME", WANT_CS, WANT_ESP, LAYOUT, WANT_ERR, WANT_RET_CS, VIA, SITE: print and judge the last
; case; SITE is the return address the frame should hold (printed as "site" when it does).
; VIA is `kernel` (call report) or `user` (int 0x86, the report service).
        .macro check name, want_cs, want_esp, layout, want_err, want_ret_cs, via, site=0
        jmp check_over\@
check_name\@:
        .asciz \name
check_over\@:
        mov esi, check_name\@
        mov ebx, \want_cs
        mov ecx, \want_esp
        mov edx, \layout
        mov edi, \want_err
        mov ebp, \want_ret_cs
        mov eax, \site
        .ifdef VIA_IS_\via
        call report
        .else
        int 0x86
        .endif
        .endm
        .equ VIA_IS_kernel, 1

_start:
        pm_setup
        set_gate 13, probe_gp, INTGATE
        set_gate 0x80, con_syscall, USERGATE
        set_gate 0x41, int41_target, INTGATE
        set_gate 0x81, int81_target, INTGATE
        set_gate 0x82, int82_target, USERGATE
        set_gate 0x86, report_service, USERGATE
        set_gate 0x87, finish, USERGATE
        lgdt [ft_gdtr]                  ; pm.inc's GDT plus the call gates (CS is reloaded by the first case)
        print "far_transfers: far jmp/call/ret, call gates, int n and iret; where each one lands\n"

        ; --- ring 0 -> ring 0 ---------------------------------------------------------------------------
        mov esp, KSP
        start k_jmp_back
        jmp far KCODE:k_jmp_target
k_jmp_target:
        land
k_jmp_back:
        probe_disarm
        check "jmp far 0008", KCODE, KSP, NONE, NO_FAULT, 0, kernel

        mov esp, KSP
        start k_call_back
        call far KCODE:k_call_target
k_call_back:
        call took_return
        check "call far 0008", KCODE, KSP - 8, RET, NO_FAULT, KCODE, kernel, k_call_back
        call return_landing
        check "retf to 0008", KCODE, KSP, NONE, NO_FAULT, 0, kernel

        mov esp, KSP
        start k_gate_back
        call far GATE0:0                ; the offset is ignored: the gate names the target
k_gate_back:
        call took_return
        check "call far gate 0040 (DPL 0)", KCODE, KSP - 8, RET, NO_FAULT, KCODE, kernel, k_gate_back
        call return_landing
        check "retf from the gate", KCODE, KSP, NONE, NO_FAULT, 0, kernel

        mov esp, KSP
        start k_int_back
        int 0x41                        ; below 0x80: at CPL 0 int 0x80 and up are sun4v hypervisor traps
k_int_back:
        call took_return
        check "int 0x41 (DPL-0 gate)", KCODE, KSP - 12, RET, NO_FAULT, KCODE, kernel, k_int_back
        call return_landing
        check "iretd to 0008", KCODE, KSP, NONE, NO_FAULT, 0, kernel

        ; --- ring 0 -> ring 3 and back ------------------------------------------------------------------
        mov esp, KSP
        mov dword ptr [land_cs], 0xFFFFFFFF
        enter_ring3 user

user:
        mov ax, UDATA                   ; iretd to ring 3 nulled DS and ES (DPL 0 < CPL 3)
        mov ds, ax
        mov es, ax
        land
        check "iretd to ring 3", UCODE, USTACK, NONE, NO_FAULT, 0, user

        mov esp, USTACK
        start u_int82_back
        int 0x82
u_int82_back:
        call took_return
        check "int 0x82 (DPL-3 gate) from ring 3", KCODE, KSTACK - 20, RET_INT_OUTER, NO_FAULT, UCODE, user, u_int82_back
        call return_landing
        check "iretd back to ring 3", UCODE, USTACK, NONE, NO_FAULT, 0, user

        mov esp, USTACK
        start u_gate_back
        call far GATE3:0
u_gate_back:
        call took_return
        check "call far gate 004b (DPL 3) from ring 3", KCODE, KSTACK - 16, RET_CALL_OUTER, NO_FAULT, UCODE, user, u_gate_back
        call return_landing
        check "retf back to ring 3", UCODE, USTACK, NONE, NO_FAULT, 0, user

        mov esp, USTACK
        start u_int81_back
        int 0x81
u_int81_back:
        probe_disarm
        check "int 0x81 (DPL-0 gate) from ring 3", 0, 0, NONE, 0x81 * 8 + 2, 0, user

        mov esp, USTACK
        start u_call_back
        call far KCODE:k_never
u_call_back:
        probe_disarm
        check "call far 0008 from ring 3", 0, 0, NONE, KCODE, 0, user

        mov esp, USTACK
        start u_jmp_back
        jmp far KCODE:k_never
u_jmp_back:
        probe_disarm
        check "jmp far 0008 from ring 3", 0, 0, NONE, KCODE, 0, user

        mov esp, USTACK
        start u_retf_back
        push KCODE                      ; a return to a more privileged ring
        push k_never
        retf
u_retf_back:
        probe_disarm
        mov esp, USTACK                 ; the faulting retf left its two words
        check "retf to 0008 from ring 3", 0, 0, NONE, KCODE, 0, user

        int 0x87

; --- landing sites ------------------------------------------------------------------------------------
k_call_target:
        land
        retf
int41_target:
int81_target:
int82_target:
        land
        iretd
k_gate_target:
        land
        retf
k_never:
        land                            ; a far transfer that should have faulted
        print "landed where no transfer may land\n"
        exit GUEST_ID * 16 + 15

; took_return: at the return site of a call or int: the probe is over; keep CS and ESP of the return
; landing (the case itself left its own landing in land_*). Called, so it subtracts its return address.
took_return:
        probe_disarm
        push eax
        lea eax, [esp + 8]
        mov dword ptr [back_esp], eax
        mov eax, cs
        and eax, 0xFFFF
        mov dword ptr [back_cs], eax
        pop eax
        ret

; return_landing: make the return landing the current one (none, if the call itself never landed).
return_landing:
        cmp dword ptr [land_cs], 0xFFFFFFFF
        je return_landing_done
        push eax
        mov eax, dword ptr [back_cs]
        mov dword ptr [land_cs], eax
        mov eax, dword ptr [back_esp]
        mov dword ptr [land_esp], eax
        pop eax
return_landing_done:
        mov dword ptr [probe_err], NO_FAULT     ; a missing return shows as "no landing"
        ret

; report: one line for the last case. esi name, ebx wanted CS, ecx wanted ESP, edx frame layout,
; edi wanted #GP error code (NO_FAULT: a landing is wanted), ebp wanted CS in the frame, eax the return
; address the frame should hold.
report:
        call con_puts
        print ":"
        print_probe
        cmp dword ptr [land_cs], 0xFFFFFFFF
        jne report_landed
        cmp dword ptr [probe_err], NO_FAULT
        jne report_judge
        print " no landing"
        jmp report_judge
report_landed:
        print " cs="
        print_hex16 dword ptr [land_cs]
        print " esp="
        print_hex32 dword ptr [land_esp]
        cmp edx, NONE
        je report_judge
        print " ret="
        print_hex16 dword ptr [land_frame + 4]
        print ":"
        cmp dword ptr [land_frame], eax
        jne report_raw_eip
        print "site"
        jmp report_outer
report_raw_eip:
        print_hex32 dword ptr [land_frame]
report_outer:
        cmp edx, RET_CALL_OUTER
        jne report_int_outer
        print " from="
        print_hex16 dword ptr [land_frame + 12]
        print ":"
        print_hex32 dword ptr [land_frame + 8]
report_int_outer:
        cmp edx, RET_INT_OUTER
        jne report_judge
        print " from="
        print_hex16 dword ptr [land_frame + 16]
        print ":"
        print_hex32 dword ptr [land_frame + 12]
report_judge:
        expect dword ptr [probe_err], edi
        cmp edi, NO_FAULT
        jne report_done
        expect dword ptr [land_cs], ebx
        expect dword ptr [land_esp], ecx
        cmp edx, NONE
        je report_done
        expect dword ptr [land_frame], eax
        movzx eax, word ptr [land_frame + 4]
        expect eax, ebp
report_done:
        verdict
        ret

report_service:                         ; int 0x86 from ring 3
        call report
        iretd

finish:                                 ; int 0x87 from ring 3
        summary "far_transfers"

        console_lib
        pm_data

        .align 8
ft_gdt:
        .dword 0, 0
        .dword 0x0000FFFF, 0x00CF9A00   ; 0x08 code, DPL 0
        .dword 0x0000FFFF, 0x00CF9200   ; 0x10 data, DPL 0
        .dword 0x0000FFFF, 0x00CFFA00   ; 0x1b code, DPL 3
        .dword 0x0000FFFF, 0x00CFF200   ; 0x23 data, DPL 3
        .word  0x0067, pm_tss & 0xFFFF  ; 0x28 TSS, busy (pm_setup loaded TR)
        .byte  (pm_tss >> 16) & 0xFF, 0x8B, 0x00, pm_tss >> 24
        .dword 0x0000FFFF, 0x00CFBA00   ; 0x31 code, DPL 1
        .dword 0x0000FFFF, 0x00CFB200   ; 0x39 data, DPL 1
        .word  k_gate_target & 0xFFFF, KCODE     ; 0x40 call gate, DPL 0, no parameters
        .word  0x8C00, k_gate_target >> 16
        .word  k_gate_target & 0xFFFF, KCODE     ; 0x48 call gate, DPL 3, no parameters
        .word  0xEC00, k_gate_target >> 16
ft_gdtr:
        .word ft_gdtr - ft_gdt - 1
        .dword ft_gdt

        .align 4
land_cs:        .dword 0
land_esp:       .dword 0
land_frame:     .space 20
back_cs:        .dword 0
back_esp:       .dword 0
