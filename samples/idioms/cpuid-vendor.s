# cpuid-vendor: CPUID leaf 0x40000000, EBX compared with 'VMwa' (0x61774d56), then ECX and EDX.
.intel_syntax noprefix
.text
hv_vendor:
    push ebx
    mov eax, 0x40000000
    cpuid
    xor eax, eax
    cmp ebx, 0x61774d56
    jne 1f
    cmp ecx, 0x4d566572
    jne 1f
    cmp edx, 0x65726177
    jne 1f
    inc eax
1:  pop ebx
    ret
