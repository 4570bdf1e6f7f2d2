# vmware-backdoor: EAX = 'VMXh', ECX = 0x0A (get version), DX = 'VX', then IN; VMware answers EBX = 'VMXh'.
.intel_syntax noprefix
.text
vmware_backdoor:
    push ebx
    mov eax, 0x564d5868
    mov ebx, 0
    mov ecx, 0x0a
    mov dx, 0x5658
    in eax, dx
    cmp ebx, 0x564d5868
    sete al
    movzx eax, al
    pop ebx
    ret
