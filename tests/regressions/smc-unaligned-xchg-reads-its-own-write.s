; why: random images (popek bench images, image 307): an unaligned `xchg dword ptr [eax], ebp` whose four
;      bytes end on its own first byte. Unicorn stores the dword a byte at a time (the page holds
;      translated code), makes the three bytes before the instruction, then reaches the running block and
;      restarts the instruction, whose rerun read the half-made store: EBP ended 0x87223344. On the CPU the
;      exchange is one locked access: EBP gets the old dword, 0x87ccbbaa. The machine puts back what the
;      first attempt made before the rerun runs (popek.machine.selfmod).
; expect: exit exit-port 1
; expect: guest_instructions 8
; expect: state.ebp 0x87ccbbaa
; same-under: trap (no sensitive instruction: trap cannot tell it from the bare machine)
_start:
        mov ebp, 0x11223344
        mov eax, data
        jmp swap                        ; `swap` begins a block; `data` is in none
        .align 4
        .byte 0                         ; `data` is not dword-aligned
data:   .byte 0xaa, 0xbb, 0xcc
swap:   xchg dword ptr [eax], ebp       ; data..swap: aa bb cc 87 -> 44 33 22 11
        cmp ebp, 0x87ccbbaa
        jne wrong
        mov al, 1
        out 0xf4, al
wrong:  mov al, 2
        out 0xf4, al
