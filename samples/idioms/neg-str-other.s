# negative: STR compared with 0x28 (the usual native selector), not 0x4000.
.intel_syntax noprefix
.text
neg_str_other:
    str ax
    cmp ax, 0x28
    sete al
    ret
