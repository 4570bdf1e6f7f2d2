; callret: a near call to a function that returns at once, N times, in the kernel. Adams & Agesen's
; "call/ret": free on hardware, a return through the translator's lookup under binary translation.
        .include "nano.inc"
_start:
        pm_setup
        mov ecx, N
again:
        .ifndef EMPTY
        call function
        .endif
        dec ecx
        jnz again
        exit 0
function:
        ret
        pm_data
