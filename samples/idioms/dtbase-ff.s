# dtbase-ff: SGDT, then base >> 24 == 0xFF (a GDT parked at the top of the address space).
.intel_syntax noprefix
.text
dtbase_ff:
    sub esp, 8
    sgdt [esp]
    mov eax, dword ptr [esp+2]
    add esp, 8
    shr eax, 24
    cmp eax, 0xff
    sete al
    movzx eax, al
    ret
