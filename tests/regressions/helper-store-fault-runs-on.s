; why: machine bug, found while running down bench images 307 (bt counted one instruction fewer than
;      native). A store that Unicorn makes in a helper (fnsave here; fnstenv, fxsave, xsave, fstp m80,
;      fbstp, cmpxchg8b alike) does not stop at a bad access: the helper makes its other stores, the
;      instruction completes (fnsave then reinitialises the FPU, emptying its stack) and Unicorn stops
;      after it, with the next instruction counted. So the #GP frame named the hlt after the fnsave, the
;      1.0 that fld1 pushed was gone, and the count was one high. Hardware faults at the fnsave with the
;      FPU as it was; the machine now puts the CPU back to the first bad access (corrected:
;      store-fault-ran-on).
; expect: exit exit-port 1
; expect: state.ebx 0x3f800000
; expect: state.ecx 0x10002a
; expect: guest_instructions 16
        .equ IDT, 0x90000
_start:
        mov esp, 0x80000
        mov eax, gp_handler
        mov edx, cs
        shl edx, 16
        mov dx, ax
        mov ax, 0x8E00
        mov [IDT + 13*8], edx
        mov [IDT + 13*8 + 4], eax
        lidt [idtr]
        fld1
        fnsave [0x5000000]              ; outside RAM: #GP(0), nothing saved, the FPU unchanged
        hlt
gp_handler:
        mov ecx, [esp + 4]              ; the EIP of the fault: the fnsave's
        fstp dword ptr [0x70000]        ; the top of the FPU stack: still 1.0
        mov ebx, [0x70000]
        mov eax, 1
        out 0xf4, al
        hlt
        .align 4
idtr:
        .word 0x7FF
        .dword IDT
