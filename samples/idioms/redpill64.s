# redpill, 64-bit: SIDT stores a 10-byte descriptor; bits 24..31 of the base are still checked.
.intel_syntax noprefix
.text
redpill64:
    sub rsp, 16
    sidt [rsp]
    mov rax, qword ptr [rsp+2]
    shr rax, 24
    cmp al, 0xd0
    seta al
    movzx eax, al
    add rsp, 16
    ret
