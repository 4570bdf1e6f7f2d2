; pong.s: the guest domain of ping-pong.toml. It brings up channel 0 to the service domain, and answers
; each of three messages with the same text, "ping" turned into "pong". sun4v only (-D SUN4V).
        .include "../guests/pm.inc"
        .include "../guests/console.inc"
        .include "ldc.inc"
        .equ GUEST_ID, 2

_start:
        mov esp, KSTACK
        ldc_setup
        print "ldg1: channel 0 is up\n"
        mov edi, 3
answer:
        call ldc_recv
        print "ldg1: got "
        mov esi, ldc_msg
        call con_puts
        print ", answering\n"
        mov byte ptr [ldc_msg + 1], 'o'
        call ldc_send
        dec edi
        jnz answer
        print "ldg1: done\n"
        exit 0

        console_lib
        ldc_lib
        pm_data
