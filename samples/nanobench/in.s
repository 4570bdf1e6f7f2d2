; in: a port read from an emulated device — COM1's line status register (port 0x3FD) — N times, in the
; kernel. Adams & Agesen's "in".
; `-D PV` builds the pv column: COM1 is a granted port, so each read traps into the hypervisor.
        .include "nano.inc"
_start:
        plat_setup
        mov dx, COM1 + 5
        mov ecx, N
again:
        .ifndef EMPTY
        in al, dx
        .endif
        dec ecx
        jnz again
        exit 0
        pm_data
