; why: machine bug, corrected. A store that rewrites an instruction of the translation block it is
;      executing in (here the immediate of the next instruction) was counted twice in guest_instructions:
;      Unicorn 2.1.4 invalidates the block, restores the CPU to the start of the store and executes it
;      again (the store takes effect once; only the count was off, and with it the PIT, which ticks on
;      counted instructions). The machine now takes the rerun off the count (popek.machine.selfmod).
; expect: exit exit-port 6
; expect: guest_instructions 4
; same-under: trap (it runs no sensitive instruction: trap cannot tell it from the bare machine)
_start:
        xor eax, eax
        add byte ptr [imm + 1], 1       ; the immediate of the next instruction: 5 becomes 6
imm:    mov al, 5
        out 0xf4, al
