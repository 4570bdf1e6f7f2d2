# negative: SIDT whose base is loaded and returned, never compared.
.intel_syntax noprefix
.text
neg_sidt_unused:
    sub esp, 8
    sidt [esp]
    mov eax, dword ptr [esp+2]
    add esp, 8
    ret
