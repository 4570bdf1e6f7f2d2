# cpuid-hv-leaf (weaker match): leaf 0x40000000 queried, the signature stored, not compared nearby.
.intel_syntax noprefix
.equ SIG, 0x00402000
.text
hv_leaf:
    push ebx
    mov eax, 0x40000000
    cpuid
    mov dword ptr [SIG], ebx
    mov dword ptr [SIG+4], ecx
    mov dword ptr [SIG+8], edx
    pop ebx
    ret
