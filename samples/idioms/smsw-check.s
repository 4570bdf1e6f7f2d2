# smsw-check: SMSW into a register, compared with a machine-status-word pattern (0x8001003x).
.intel_syntax noprefix
.text
smsw_check:
    smsw eax
    and eax, 0xfffffff0
    cmp eax, 0x80010030
    sete al
    movzx eax, al
    ret
