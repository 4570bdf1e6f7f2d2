# negative: the IDT *limit* (not the base) compared with 0xd0.
.intel_syntax noprefix
.text
neg_sidt_limit:
    sub esp, 8
    sidt [esp]
    movzx eax, word ptr [esp]
    add esp, 8
    cmp eax, 0xd0
    seta al
    ret
