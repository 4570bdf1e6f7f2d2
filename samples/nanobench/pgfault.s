; pgfault: a true guest page fault, taken, handled and resumed, N times, in the kernel with paging on.
; Each iteration clears the present bit of TARGET's page-table entry, flushes its TLB entry and reads
; TARGET: #PF; the handler sets the present bit again and returns, and the read completes. The EMPTY twin
; does the same stores, invlpg and read with the present bit kept: the difference is the fault alone.
; Adams & Agesen's "pgfault".
        .include "nano.inc"
_start:
        pm_setup
        set_gate 14, page_fault, INTGATE
        paging_on
        mov ecx, N
again:
        .ifdef EMPTY
        mov dword ptr [TARGET_PTE], TARGET + 3
        .else
        mov dword ptr [TARGET_PTE], TARGET + 2  ; writable, not present
        .endif
        invlpg [TARGET]
        mov eax, dword ptr [TARGET]
        dec ecx
        jnz again
        exit 0
page_fault:
        mov dword ptr [TARGET_PTE], TARGET + 3
        add esp, 4                              ; the error code
        iretd
        pm_data
