; why: machine bug, found by popek bench images (image 2 of seed 0: native EFLAGS 0x57, bt 0x46 after a
;      triple fault). An access outside guest RAM faults (#GP(0)) and a fault changes no flag, so the
;      EFLAGS image of the #GP frame must be the flags of the add before it (0 + 0: ZF and PF, 0x46).
;      Unicorn 2.1.4 reports stale lazy flags (0x57, CF and AF set as well) after an invalid memory access
;      whenever a code hook runs on the instruction, and emu_start's instruction count (which the machine
;      uses for its budget and clock) is such a hook; without it Unicorn reports 0x46. Every monitor runs
;      on the same engine, so they agree with native on the wrong value; bt, whose blocks differ, sometimes
;      gets the right one, and then it "diverges".
; expect: exit exit-port 70
; expect: guest_instructions 15
; xfail: Unicorn's lazy flags after a faulting access under a code hook (native pushes EFLAGS 0x57, not 0x46)
        .equ IDT, 0x90000
_start:
        mov eax, gp_handler
        mov edx, cs
        shl edx, 16
        mov dx, ax
        mov ax, 0x8E00
        mov [IDT + 13*8], edx
        mov [IDT + 13*8 + 4], eax
        lidt [idtr]
        mov eax, 0x50000
        xor ebx, ebx
        mov edx, 0x1234
        add byte ptr [eax], al          ; 0 + 0: ZF and PF set, CF and AF clear (EFLAGS 0x46)
        add byte ptr [ebx - 0x57], dh   ; outside RAM: #GP(0), which changes no flag
        hlt
gp_handler:
        mov eax, [esp + 12]             ; the EFLAGS image, above the error code, EIP and CS
        out 0xf4, al
        hlt
        .align 4
idtr:
        .word 0x7FF
        .dword IDT
