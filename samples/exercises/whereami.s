; whereami.s: a small kernel that prints a fingerprint of the machine it runs on. It mixes privileged
; instructions (which a trap-and-emulate monitor sees and emulates) with sensitive-unprivileged ones
; (which it does not see). Which of them make it print something else under `trap` than on the bare
; machine? (popek exercise show 2)
        .include "../guests/pm.inc"
        .include "../guests/console.inc"
        .equ GUEST_ID, 9

_start:
        pm_setup
        print "whereami: fingerprint of this machine\n"
probe_start:                            ; the exercise asks about the instructions from here to probe_end
        lidt [pm_idtr]                  ; reload the interrupt table
        cli
        smsw ax                         ; the low half of CR0
        and eax, 0xFFFF
        print "msw="
        print_hex16 eax
        mov ax, ss                      ; the stack segment's selector
        and eax, 0xFFFF
        print " ss="
        print_hex16 eax
        pushfd                          ; interrupts still off?
        pop eax
        shr eax, 9
        and eax, 1
        print " if="
        print_dec eax
        print "\n"
probe_end:
        sti
        exit 0

        pm_data
        console_lib
