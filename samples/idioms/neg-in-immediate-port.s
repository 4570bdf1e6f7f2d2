# negative: the magic values are in EAX and DX, but IN reads an immediate port (0x60), not the port in DX.
.intel_syntax noprefix
.text
neg_in_imm:
    mov eax, 0x564d5868
    mov dx, 0x5658
    in al, 0x60
    ret
