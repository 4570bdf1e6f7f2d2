# cpuid-vendor, 64-bit: leaf 0x40000000, EBX compared with 'KVMK' (0x4b4d564b).
.intel_syntax noprefix
.text
kvm_vendor64:
    push rbx
    mov eax, 0x40000000
    cpuid
    cmp ebx, 0x4b4d564b
    sete al
    movzx eax, al
    pop rbx
    ret
