; divzero: a divide error (#DE) handled by the guest, N times, in the kernel: div by zero, the handler
; skips the 2-byte div and returns. The EMPTY twin divides by one (no fault). Adams & Agesen's "divzero".
        .include "nano.inc"
_start:
        pm_setup
        set_gate 0, divide_error, INTGATE
        .ifdef EMPTY
        mov ebx, 1
        .else
        xor ebx, ebx
        .endif
        mov ecx, N
again:
        xor edx, edx
        mov eax, ecx
        div ebx
        dec ecx
        jnz again
        exit 0
divide_error:
        add dword ptr [esp], 2                  ; past div ebx (f7 f3)
        iretd
        pm_data
