# cpuid-hypervisor-bit: CPUID leaf 1, ECX bit 31 (hypervisor present) tested with BT.
.intel_syntax noprefix
.text
hv_bit:
    push ebx
    mov eax, 1
    cpuid
    bt ecx, 31
    setc al
    movzx eax, al
    pop ebx
    ret
