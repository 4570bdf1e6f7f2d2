; ping.s: the service domain of ping-pong.toml. It prints its machine description (mach_desc), brings
; up channel 0 to the guest domain, sends three messages and prints each reply. sun4v only (-D SUN4V).
        .include "../guests/pm.inc"
        .include "../guests/console.inc"
        .include "ldc.inc"
        .equ GUEST_ID, 1

        .macro exchange text
        jmp exchange_over\@
exchange_str\@:
        .asciz \text
exchange_over\@:
        mov esi, exchange_str\@
        call ldc_send
        print "primary: sent "
        call con_puts
        print "\n"
        call ldc_recv
        print "primary: got "
        mov esi, ldc_msg
        call con_puts
        print "\n"
        .endm

_start:
        mov esp, KSTACK
        mov ebx, desc
        mov ecx, 256
        hvcall HV_MACH_DESC             ; ecx: the description's length
        mov esi, desc
        con_write
        ldc_setup
        print "primary: channel 0 is up\n"
        exchange "ping 1"
        exchange "ping 2"
        exchange "ping 3"
        print "primary: done\n"
        exit 0

        console_lib
        ldc_lib
desc:   .space 256
        pm_data
