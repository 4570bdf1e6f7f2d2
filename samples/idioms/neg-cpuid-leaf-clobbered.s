# negative: EAX = 1 is set up, but a call may change it before CPUID.
.intel_syntax noprefix
.text
neg_clobbered:
    push ebx
    mov eax, 1
    call 1f
    cpuid
    bt ecx, 31
    setc al
    pop ebx
    ret
1:  ret
