; syscall.s: ring 3 entered with iretd; system calls with int 0x80 through a DPL-3 trap gate.
; eax = 1: write the byte in bl to the console; eax = 2: exit with the code in bl.
; The handler checks that it runs on the kernel stack from the TSS, below the ring-3 frame. `-D PV` builds
; the paravirtual version (platform.inc): the gate is a trap-table entry, the stack is set by stack_switch.
        .include "pm.inc"
_start:
        plat_setup
        plat_gate 0x80, syscall, USERGATE
        enter_ring3 user

user:
        mov ax, UDATA
        mov ds, ax
        mov es, ax
        mov esi, text
next_char:
        mov bl, byte ptr [esi]
        test bl, bl
        jz finished
        mov eax, 1
        int 0x80
        inc esi
        jmp next_char
finished:
        mov eax, 2
        mov bl, 0
        int 0x80
        hlt                             ; not reached

syscall:
        ; frame on the kernel stack: eip, cs, eflags, esp, ss (int n pushes no error code)
        cmp dword ptr [esp + 4], UCODE
        jne bad
        cmp dword ptr [esp + 16], UDATA
        jne bad
        cmp esp, KSTACK - 20
        jne bad
        cmp eax, 1
        je sys_write
        cmp eax, 2
        je sys_exit
bad:
        exit 99
sys_write:
        push edx
        mov al, bl
        putc
        pop edx
        kiret
sys_exit:
        mov al, bl
        out EXIT, al

text:
        .asciz "ring 3 says hi\n"

        pm_data
