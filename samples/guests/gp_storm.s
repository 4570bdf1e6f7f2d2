; gp_storm.s: 10,000 cli at ring 3 (IOPL 0): each raises #GP(0); the handler counts it in ebx, skips
; the one-byte cli and returns. It exercises the Unicorn repeated-#GP workaround: every #GP must arrive.
        .include "pm.inc"
_start:
        pm_setup
        set_gate 13, gp, INTGATE
        set_gate 0x80, done, USERGATE
        xor ebx, ebx
        enter_ring3 user

user:
        mov ecx, 10000
again:
        cli
        loop again
        int 0x80

gp:
        cmp dword ptr [esp], 0          ; error code 0
        jne bad
        inc ebx
        add dword ptr [esp + 4], 1      ; skip the cli
        add esp, 4                      ; pop the error code
        iretd
bad:
        exit 99
done:
        exit 0

        pm_data
