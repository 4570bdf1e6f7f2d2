; crwr: a privileged control-register write, N times, in the kernel. Adams & Agesen wrote CR8 (the task
; priority register), which exists in 64-bit mode only; in 32-bit mode CR2 is the control register whose
; write has no side effect (no paging, cache or mode change), so it measures the write alone.
        .include "nano.inc"
_start:
        pm_setup
        mov eax, 0x1234
        mov ecx, N
again:
        .ifndef EMPTY
        mov cr2, eax
        .endif
        dec ecx
        jnz again
        exit 0
        pm_data
