; why: machine bug, found by popek bench images (image 2 of seed 0: native EFLAGS 0x57, bt 0x46 after a
;      triple fault). An access outside guest RAM faults (#GP(0)) and a fault changes no flag, so the
;      EFLAGS image of the #GP frame must be the flags of the add before it (0 + 0: ZF and PF, 0x46).
;      Unicorn 2.1.4 computes the flags into EFLAGS form after every code hook (the machine's count hook
;      is one) while the instruction's restore record keeps the operation before, so a fault inside the
;      instruction left "add" over computed flags and EFLAGS read 0x57 (CF and AF as well). The machine
;      now puts the record right at such a fault (corrected: flags-at-fault).
; expect: exit exit-port 70
; expect: guest_instructions 15
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
