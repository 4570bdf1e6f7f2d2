; why: random images (popek bench images, image 145): `mov word ptr [eax], es` at an odd address, storing
;      into its own two bytes. Unicorn makes an unaligned store into a page holding translated code a byte
;      at a time with its write hooks off; the first byte lands in the running block, so the instruction
;      leaves through QEMU's restart and reruns, and the write hooks stayed off after it (nothing saw the
;      rerun, which was counted: one instruction too many). The machine now sees the rerun at its block and
;      takes it off the count (popek.machine.selfmod). On the CPU the store rewrites the instruction after it
;      was fetched: it runs once, as it was, and leaves 10 00 behind.
; expect: exit exit-port 16
; expect: guest_instructions 5
; same-under: trap (no sensitive instruction: trap cannot tell it from the bare machine)
_start:
        mov eax, here
        jmp here
        .align 4
        nop                             ; `here` is odd: the word store is unaligned
here:   mov word ptr [eax], es          ; es = 0x10: the bytes 8c 00 become 10 00
        mov al, [here]
        out 0xf4, al
