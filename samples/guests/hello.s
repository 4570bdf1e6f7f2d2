; hello.s: console output on COM1, waiting for "transmitter empty" in the line status register
; (port 0x3FD) before each byte, then exit code 0. Runs in the boot state: no setup at all.
; `-D PV` builds the paravirtual version: one console_io hypercall instead of a port access per byte.
; (The native build runs under pv too: the domain is granted COM1 and the exit port.)
        .include "pm.inc"
_start:
        .ifdef PV
        mov esi, message
        mov ecx, message_end - message
        con_write
        exit 0
        .endif
        mov esi, message
next:
        lodsb
        test al, al
        jz done
        mov bl, al
        mov dx, 0x3FD
wait_empty:
        in al, dx
        test al, 0x20
        jz wait_empty
        mov al, bl
        mov dx, 0x3F8
        out dx, al
        jmp next
done:
        mov al, 0
        out 0xF4, al
message:
        .ascii "hello, world\n"
message_end:
        .byte 0
