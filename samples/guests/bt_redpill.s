; bt_redpill.s: Red Pill (Rutkowska, 2004) as the original did it: the 8 bytes `sidt [m]; ret` are written
; into a data buffer and called, and the IDT base's top byte says "VM" when above 0xD0. Then the same
; buffer is rewritten three times and called again each time (sgdt, str, smsw): code written after the
; buffer was last translated must run as written. The buffer sits in its own page, away from the image.
; A ring-3 part does the same from user mode (a user stub, and sidt/sgdt in the image itself), where a
; monitor that runs user code untranslated lets the real registers show (popek diff --monitor bt
; --direct-user). Natively every line is ok; exit code 0xC0.
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 12
        .equ STUB, 0x300000             ; the kernel's buffer (a page of its own)
        .equ USTUB, 0x301000            ; the user's buffer
        .equ M, 0x302000                ; where the stubs store (6 bytes)

        .macro build_stub b0, b1, b2, b3, b4, b5, b6, b7
        mov byte ptr [STUB + 0], \b0
        mov byte ptr [STUB + 1], \b1
        mov byte ptr [STUB + 2], \b2
        mov byte ptr [STUB + 3], \b3
        mov byte ptr [STUB + 4], \b4
        mov byte ptr [STUB + 5], \b5
        mov byte ptr [STUB + 6], \b6
        mov byte ptr [STUB + 7], \b7
        .endm

_start:
        pm_setup
        set_gate 13, probe_gp, INTGATE
        set_gate 0x80, con_syscall, USERGATE
        set_gate 0x87, finish, USERGATE

        ; sidt [M]; ret
        build_stub 0x0F, 0x01, 0x0D, M & 0xFF, (M >> 8) & 0xFF, (M >> 16) & 0xFF, M >> 24, 0xC3
        mov dword ptr [M + 2], 0
        mov eax, STUB
        call eax
        print "red pill (sidt in a buffer): base="
        print_hex32 dword ptr [M + 2]
        print " limit="
        print_hex16 dword ptr [M]
        mov al, byte ptr [M + 5]
        cmp al, 0xD0
        ja looks_like_vm
        print " (top byte <= d0: no VM)"
looks_like_vm:
        expect dword ptr [M + 2], IDT
        expect word ptr [M], 256 * 8 - 1
        verdict
        ; sgdt [M]; ret
        build_stub 0x0F, 0x01, 0x05, M & 0xFF, (M >> 8) & 0xFF, (M >> 16) & 0xFF, M >> 24, 0xC3
        mov eax, STUB
        call eax
        print "rewritten: sgdt base="
        print_hex32 dword ptr [M + 2]
        expect dword ptr [M + 2], pm_gdt
        verdict
        ; str ax; ret; nops
        build_stub 0x66, 0x0F, 0x00, 0xC8, 0xC3, 0x90, 0x90, 0x90
        xor eax, eax
        call dword ptr [stub_pointer]
        print "rewritten: str="
        print_hex16 eax
        expect eax, TSSSEL
        verdict
        ; smsw eax; ret; nops
        build_stub 0x0F, 0x01, 0xE0, 0xC3, 0x90, 0x90, 0x90, 0x90
        xor eax, eax
        call dword ptr [stub_pointer]
        print "rewritten: smsw="
        print_hex16 eax
        expect eax, 0x11
        verdict

        ; --- ring 3: the same from user mode ---
        mov esi, user_stub
        mov edi, USTUB
        mov ecx, 8
        rep movsb
        enter_ring3 user

user:
        mov ax, UDATA
        mov ds, ax
        mov es, ax
        mov dword ptr [M + 2], 0
        mov eax, USTUB
        call eax                        ; sidt [M] in a user buffer
        uprint "ring 3 red pill (buffer): base="
        uprint_hex32 dword ptr [M + 2]
        cmp dword ptr [M + 2], IDT
        je user_ok1
        mov byte ptr [con_bad], 1
user_ok1:
        uverdict
        sidt [idt_seen]                 ; in the image: popek diff observes these
        sgdt [gdt_seen]
        uprint "ring 3 sidt/sgdt (image): "
        uprint_hex32 dword ptr [idt_seen + 2]
        uprint " "
        uprint_hex32 dword ptr [gdt_seen + 2]
        cmp dword ptr [idt_seen + 2], IDT
        je user_ok2
        mov byte ptr [con_bad], 1
user_ok2:
        cmp dword ptr [gdt_seen + 2], pm_gdt
        je user_ok3
        mov byte ptr [con_bad], 1
user_ok3:
        uverdict
        int 0x87

finish:
        mov ax, KDATA
        mov ds, ax
        summary "bt_redpill"

user_stub:
        .byte 0x0F, 0x01, 0x0D, M & 0xFF, (M >> 8) & 0xFF, (M >> 16) & 0xFF, M >> 24, 0xC3

        console_lib
        .align 4
stub_pointer: .dword STUB
idt_seen: .space 8
gdt_seen: .space 8
        pm_data
