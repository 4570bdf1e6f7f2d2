# str-4000: STR into memory, the two bytes checked as 0x00 0x40 (ScoopyNG style), i.e. TR == 0x4000.
.intel_syntax noprefix
.text
str_4000:
    sub esp, 4
    str word ptr [esp]
    mov al, byte ptr [esp]
    mov ah, byte ptr [esp+1]
    add esp, 4
    cmp ax, 0x4000
    sete al
    movzx eax, al
    ret
