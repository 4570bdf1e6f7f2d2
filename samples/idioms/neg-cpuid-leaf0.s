# negative: CPUID leaf 0 vendor check ('Genu'): a CPU vendor, not a hypervisor.
.intel_syntax noprefix
.text
neg_leaf0:
    push ebx
    xor eax, eax
    cpuid
    cmp ebx, 0x756e6547
    sete al
    pop ebx
    ret
