# cpuid-hypervisor-bit, TEST form; the leaf is set up through another register.
.intel_syntax noprefix
.text
hv_bit_test:
    push ebx
    xor ecx, ecx
    mov edx, 1
    mov eax, edx
    cpuid
    test ecx, 0x80000000
    setnz al
    movzx eax, al
    pop ebx
    ret
