; why: machine bug, the stale flags of smc-rerun-flags.s read by the rerun itself. adc adds CF into the
;      byte it stores into the next instruction; the first attempt saw CF clear (after 0 + 0), the rerun
;      saw the stale CF set and stored 0x41, so the guest ran "mov al, 0x41" where the CPU runs 0x40.
; expect: exit exit-port 64
; same-under: trap (no sensitive instruction: trap cannot tell it from the bare machine)
_start:
        xor eax, eax
        add eax, eax                    ; CF clear
        adc byte ptr [patch + 1], 0     ; the immediate of the next instruction: 0x40 + CF
patch:
        mov al, 0x40
        out 0xf4, al
        hlt
