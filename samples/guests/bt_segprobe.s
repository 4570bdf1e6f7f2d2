; bt_segprobe.s: the published VMware binary-translation probe, on this machine. The guest far-returns
; (retf) into a code segment whose base is the image start and whose limit ends just past a few bytes of
; code, then (a) jumps to a target past the limit and (b) runs off the end of the limit. On hardware both
; raise #GP(0): at the jmp (the target is checked before the jump) and at the first instruction past the
; limit. VMware's translator, which checked limits itself, reported such faults at other addresses, and
; guests could tell. Unicorn does not check segment limits (REFERENCES), so on the bare machine both
; probes run past the limit into a `ud2` and report #UD there: what this machine can show is that a
; monitor reports a fault at exactly the guest EIP the bare machine reports, in a segment whose base is
; not 0 (EIPs are offsets from the segment base, not linear addresses); what it cannot show is the limit
; check itself. (c) checks the EIP-relative values a translator must produce in such a segment: the
; return address a call pushes, the EIP an int n frame holds, and the EIP of a fault in a callee.
; Exit code 0xB0 natively: the lines print what happened; the verdicts check the offsets.
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 11
        .equ B, 0x100000                ; base of the probe segments: the image start
        .equ LIMITED, 0x40              ; code, base B, byte limit ending just past probe_a/probe_b
        .equ BASED, 0x48                ; code, base B, limit 4 GiB

_start:
        pm_setup
        mov esi, pm_gdt                 ; the pm.inc GDT plus the two probe segments
        mov edi, gdt
        mov ecx, 16
        rep movsd
        lgdt [gdtr]
        set_gate 6, on_ud, INTGATE
        set_gate 13, on_gp, INTGATE
        set_gate 0x81, on_int, INTGATE

        ; --- (a) a jump past the limit ---
        mov dword ptr [resume], after_a
        push LIMITED
        push probe_a - B
        retf
after_a:
        print "jmp past the limit: "
        call show_fault
        print " (hardware: #GP(0000) at eip="
        print_hex32 probe_a - B
        print ")\n"

        ; --- (b) running off the end of the limit ---
        mov dword ptr [resume], after_b
        xor eax, eax
        push LIMITED
        push probe_b - B
        retf
after_b:
        print "falling past the limit: "
        call show_fault
        print " eax="
        print_hex32 eax
        print " (hardware: #GP(0000) at eip="
        print_hex32 limit_end - B
        print ")\n"

        ; --- (c) EIP-relative values in a segment with a base ---
        mov dword ptr [resume], after_c
        push BASED
        push probe_c - B
        retf
after_c:
        print "call in a based segment: pushed "
        print_hex32 ebx
        expect ebx, ret_c - B
        verdict
        print "int 0x81 in a based segment: frame "
        print_hex16 dword ptr [int_cs]
        print ":"
        print_hex32 dword ptr [int_eip]
        expect dword ptr [int_eip], after_int - B
        expect dword ptr [int_cs], BASED
        verdict
        print "fault in a callee: "
        call show_fault
        expect dword ptr [fault_eip], ud_c - B
        expect dword ptr [fault_cs], BASED
        expect dword ptr [fault_vector], 6
        verdict
        summary "bt_segprobe"

; The probe code, reached through LIMITED or BASED (offsets from B).
probe_a:
        jmp short past_a                ; the target is past the limit
probe_b:
        inc eax
        inc eax
limit_end:                              ; LIMITED's limit ends here
        inc eax                         ; past the limit
        ud2
past_a:
        ud2
probe_c:
        call leaf_c
ret_c:
        int 0x81
after_int:
        call faulty_c
        ud2                             ; not reached: the fault resumes in the flat segment
leaf_c:
        mov ebx, dword ptr [esp]
        ret
faulty_c:
        nop
ud_c:   ud2

; Fault handlers: record vector, EIP and CS, continue at [resume] in the flat kernel segment.
on_ud:
        mov dword ptr ss:[fault_vector], 6
        jmp record
on_gp:
        mov dword ptr ss:[fault_vector], 13
        add esp, 4                      ; the error code
record:
        push eax
        mov eax, dword ptr ss:[esp + 4]
        mov dword ptr ss:[fault_eip], eax
        mov eax, dword ptr ss:[esp + 8]
        mov dword ptr ss:[fault_cs], eax
        mov eax, dword ptr ss:[resume]
        mov dword ptr ss:[esp + 4], eax
        mov dword ptr ss:[esp + 8], KCODE
        pop eax
        iretd
on_int:
        push eax
        mov eax, dword ptr ss:[esp + 4]
        mov dword ptr ss:[int_eip], eax
        mov eax, dword ptr ss:[esp + 8]
        mov dword ptr ss:[int_cs], eax
        pop eax
        iretd

show_fault:
        cmp dword ptr [fault_vector], 6
        jne show_gp
        print "#UD"
        jmp show_where
show_gp:
        print "#GP"
show_where:
        print " at "
        print_hex16 dword ptr [fault_cs]
        print ":"
        print_hex32 dword ptr [fault_eip]
        ret

        console_lib
        .align 4
resume:       .dword 0
fault_vector: .dword 0
fault_eip:    .dword 0
fault_cs:     .dword 0
int_eip:      .dword 0
int_cs:       .dword 0
        .align 8
gdt:    .space 64
        ; 0x40: code, base B, byte-granular limit (limit_end - B - 1), 32-bit, DPL 0
        .dword ((limit_end - B - 1) & 0xFFFF) | ((B & 0xFFFF) << 16)
        .dword ((B >> 16) & 0xFF) | (0x9B << 8) | (((limit_end - B - 1) >> 16) << 16) | (0x4 << 20) | (B & 0xFF000000)
        ; 0x48: code, base B, limit 4 GiB
        .dword 0xFFFF | ((B & 0xFFFF) << 16)
        .dword ((B >> 16) & 0xFF) | (0x9B << 8) | (0xF << 16) | (0xC << 20) | (B & 0xFF000000)
gdtr:   .word 0x4F
        .dword gdt
        pm_data
