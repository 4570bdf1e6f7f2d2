; syscall: a system call from ring 3 — int 0x80 through a DPL-3 gate to a handler that returns at once
; (iretd) — N times. Adams & Agesen's "syscall". Ends with int 0x81, whose handler writes the exit port.
; Written with platform.inc: `-D PV` builds the pv column (a direct trap through the trap table).
        .include "nano.inc"
_start:
        plat_setup
        plat_gate 0x80, sys_null, USERGATE
        plat_gate 0x81, sys_exit, USERGATE
        enter_ring3 user
user:
        mov ecx, N
again:
        .ifndef EMPTY
        int 0x80
        .endif
        dec ecx
        jnz again
        int 0x81
sys_null:
        kiret
sys_exit:
        exit 0
        pm_data
