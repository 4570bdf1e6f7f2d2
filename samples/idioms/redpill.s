# redpill: SIDT, then the top byte of the IDT base against 0xD0 (Rutkowska's Red Pill, 2004).
.intel_syntax noprefix
.text
redpill:
    push ebp
    mov ebp, esp
    sub esp, 8
    sidt [esp]                  # limit at [esp], base at [esp+2]
    mov eax, dword ptr [esp+2]
    shr eax, 24
    cmp eax, 0xd0
    ja 1f
    xor eax, eax
    leave
    ret
1:  mov eax, 1
    leave
    ret
