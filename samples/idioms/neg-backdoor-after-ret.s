# negative: the magic values are set up, but a RET ends that path before the IN (which is another path).
.intel_syntax noprefix
.text
neg_after_ret:
    mov eax, 0x564d5868
    mov edx, 0x5658
    ret
    in eax, dx
    ret
