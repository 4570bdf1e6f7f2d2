; why: random images (popek bench images, image 252): a `hlt` with interrupts disabled followed by an
;      encoding the machine guards (here 8f c8, POP with ModRM.reg = 1, which hardware rejects with #UD and
;      Unicorn executes). Unicorn stops emulation both on hlt and before a guarded address; the machine took
;      the stop for the guard, raised the #UD of an instruction the CPU never reached and triple-faulted.
;      It now asks Unicorn's halted flag. Natively the run ends on the hlt after 3 instructions.
; expect: exit hlt None
; expect: guest_instructions 3
; expect: state.eax 0x7
; same-under: trap (cli and hlt trap and are emulated as the hardware does them)
_start:
        cli
        mov eax, 7
        hlt
        .byte 0x8f, 0xc8                ; never reached: the CPU stays halted
