# negative: CPUID leaf 1, ECX bit 0 (SSE3) tested, not bit 31.
.intel_syntax noprefix
.text
neg_sse3:
    push ebx
    mov eax, 1
    cpuid
    test ecx, 1
    setnz al
    pop ebx
    ret
