# cpuid-hypervisor-bit, 64-bit, SHR form: ECX >> 31 then tested.
.intel_syntax noprefix
.text
hv_bit64:
    push rbx
    mov eax, 1
    cpuid
    shr ecx, 31
    test ecx, ecx
    setnz al
    movzx eax, al
    pop rbx
    ret
