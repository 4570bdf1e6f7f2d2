; ptemod: a write to a live page-table entry, then a use of it, N times, in the kernel with paging on:
; each iteration maps TARGET to another frame (alternating two), flushes its TLB entry and reads through
; it. The EMPTY twin flushes and reads without the write. Adams & Agesen's "ptemod".
        .include "nano.inc"
_start:
        pm_setup
        paging_on
        mov ebx, TARGET + 3
        mov ecx, N
again:
        xor ebx, 0x1000                         ; the other frame
        .ifndef EMPTY
        mov dword ptr [TARGET_PTE], ebx
        .endif
        invlpg [TARGET]
        mov eax, dword ptr [TARGET]
        dec ecx
        jnz again
        exit 0
        pm_data
