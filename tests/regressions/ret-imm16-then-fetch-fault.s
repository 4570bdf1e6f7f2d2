; why: random images (popek bench images, image 347): `ret 0xf4a7` to an address outside RAM. The machine
;      corrects Unicorn's sign-extended `ret imm16` (ESP += the immediate zero-extended, SDM Vol. 2B RET),
;      but only when nothing faulted in the step, and the fetch at the return target faulted: the #GP frame
;      was then pushed at ESP 0x10000 too low. The return completed before the fetch failed, so ESP must
;      hold the corrected value: 0x80000 + 4 + 0x8000. (No IDT: the fault ends the run; the state is the
;      one it was raised in.)
; expect: exit triple-fault None
; expect: state.esp 0x88000
; expect: guest_instructions 3
; same-under: trap (ret is not sensitive)
_start:
        mov esp, 0x80000
        push 0xfffff000                 ; the return address: outside RAM
        ret 0x8000
