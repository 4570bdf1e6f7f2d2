# sldt-sentinel: fill a buffer with 0xDEADBEEF, SLDT into it (16 bits), compare with 0xDEAD0000 (native: LDTR 0).
.intel_syntax noprefix
.text
sldt_sentinel:
    push ebp
    mov ebp, esp
    sub esp, 4
    mov dword ptr [ebp-4], 0xdeadbeef
    sldt word ptr [ebp-4]
    mov eax, dword ptr [ebp-4]
    cmp eax, 0xdead0000
    setne al
    movzx eax, al
    leave
    ret
