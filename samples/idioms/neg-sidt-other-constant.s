# negative: the top byte of the IDT base compared with 0x80 (a kernel-half test, not Red Pill).
.intel_syntax noprefix
.text
neg_sidt_other:
    sub esp, 8
    sidt [esp]
    mov eax, dword ptr [esp+2]
    add esp, 8
    shr eax, 24
    cmp eax, 0x80
    setae al
    ret
