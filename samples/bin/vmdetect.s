# vmdetect: a small Linux i386 program that tries the classic VM-detection tricks and prints what it saw.
# Our own code, written to show what `popek scan` reports on a VM-aware binary: each trick uses a
# sensitive-but-unprivileged instruction (or CPUID / the VMware backdoor port) in a recognisable idiom.
#
#   as --32 vmdetect.s -o vmdetect.o && ld -m elf_i386 -o vmdetect vmdetect.o   (samples/bin/build.sh)
.intel_syntax noprefix
.text
.globl _start

# Red Pill: the top byte of the IDT base; > 0xd0 was VMware's relocated IDT.
redpill:
    sub esp, 8
    sidt [esp]
    mov eax, dword ptr [esp+2]
    add esp, 8
    shr eax, 24
    cmp eax, 0xd0
    seta al
    movzx eax, al
    ret

# The SLDT sentinel: the stored selector replaces only the low word of a buffer pre-filled with 0xdeadbeef.
sldt_check:
    sub esp, 4
    mov dword ptr [esp], 0xdeadbeef
    sldt [esp]
    mov eax, dword ptr [esp]
    add esp, 4
    cmp eax, 0xdead0000
    setne al
    movzx eax, al
    ret

# STR: the task register was 0x4000 under VMware.
str_check:
    xor eax, eax
    str ax
    cmp eax, 0x4000
    sete al
    movzx eax, al
    ret

# CPUID leaf 1, ECX bit 31: "a hypervisor is present".
hv_bit:
    push ebx
    mov eax, 1
    cpuid
    pop ebx
    xor eax, eax
    bt ecx, 31
    setc al
    ret

# The VMware backdoor: IN from port 0x5658 with EAX = 'VMXh' answers only inside VMware
# (on bare hardware at ring 3 it faults; a real detector installs a handler first).
backdoor:
    push ebx
    mov eax, 0x564d5868
    mov ebx, 0
    mov ecx, 10
    mov dx, 0x5658
    in eax, dx
    cmp ebx, 0x564d5868
    sete al
    movzx eax, al
    pop ebx
    ret

# print(msg, len): write(1, msg, len)
print:
    push ebx
    mov eax, 4
    mov ebx, 1
    int 0x80
    pop ebx
    ret

_start:
    call redpill
    mov ecx, offset msg_redpill
    mov edx, msg_redpill_len
    test eax, eax
    jz 1f
    call print
1:  call sldt_check
    call str_check
    call hv_bit
    mov ecx, offset msg_done
    mov edx, msg_done_len
    call print
    mov eax, 1          # exit(0)
    xor ebx, ebx
    int 0x80

.data
msg_redpill: .ascii "redpill: IDT base looks relocated\n"
.set msg_redpill_len, . - msg_redpill
msg_done: .ascii "checks done\n"
.set msg_done_len, . - msg_done
