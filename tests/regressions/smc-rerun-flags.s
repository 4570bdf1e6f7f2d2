; why: machine bug, found by the bt differential (shrunk: add eax, eax four times, then a store into the
;      next instruction: native EFLAGS 0x57, bt 0x46). A store into the running block makes Unicorn drop
;      the block and run the store again alone, restoring the state to the instruction's start; under the
;      count hook that restore left the add's operation over flags already computed, so the rerun and
;      everything after it read 0x57 (CF and AF as well) for 0 + 0. The machine settles the flags at the
;      rerun (corrected: flags-at-smc-rerun); the flags here are the add's, ZF and PF: 0x46.
; expect: exit exit-port 70
        .equ IDT, 0x90000
_start:
        xor eax, eax
        add eax, eax                    ; 0 + 0: ZF and PF set, CF and AF clear (EFLAGS 0x46)
        mov byte ptr [patch], 0x90      ; into the next instruction, in the running block
patch:
        nop
        pushfd
        pop eax
        out 0xf4, al
        hlt
