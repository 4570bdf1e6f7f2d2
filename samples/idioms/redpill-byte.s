# redpill, byte form: the C original `sidt(m); return m[5] > 0xd0;` with m a global buffer.
.intel_syntax noprefix
.equ IDTR, 0x00402000
.text
redpill_byte:
    sidt [IDTR]
    cmp byte ptr [IDTR+5], 0xd0
    seta al
    movzx eax, al
    ret
