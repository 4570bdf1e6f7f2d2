; flags.s: PUSHF and POPF (Robin & Irvine: instructions that read or write sensitive registers). A kernel
; changes the interrupt flag and IOPL with cli/sti and with popf, and reads EFLAGS back with pushf.
;
; Why it matters: at CPL 0, popf writes IF and IOPL; at CPL > 0 it silently keeps them (no fault: SDM
; POPF, and REFERENCES.md), and pushf always shows the real flags. cli and sti are privileged, so a
; trap-and-emulate monitor sees them and keeps a virtual IF, but a deprivileged kernel's pushf shows the
; real IF (which the monitor keeps on to receive interrupts), and its popf cannot turn interrupts off or
; set IOPL. Predicted under trap-and-emulate: the first pushf already shows IF=1 (the real flag), so do
; "cli; pushf" and "popf IF=0"; "popf IOPL=3" does not stick; the arithmetic flags line stays ok (popf is
; not a no-op, only its system flags are).
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 2
        .equ IF_BIT,   0x200
        .equ IOPL3,    0x3000
        .equ ARITH,    0x8D5            ; OF SF ZF AF PF CF (not TF, IF, DF, NT)

        .macro show_flags
        print " eflags="
        print_hex32 ebx
        print " IF="
        mov eax, ebx
        shr eax, 9
        and eax, 1
        print_dec eax
        print " IOPL="
        mov eax, ebx
        shr eax, 12
        and eax, 3
        print_dec eax
        .endm

_start:
        plat_setup                      ; no PIT or PIC programmed: IF=1 lets nothing in
        print "flags: PUSHF/POPF and the interrupt flag in a ring-0 kernel\n"

        pushfd
        pop ebx
        print "after setup; pushf:"
        show_flags
        and ebx, IF_BIT | IOPL3
        expect ebx, 0                   ; the boot state: interrupts off, IOPL 0
        verdict

        irq_enable
        pushfd
        pop ebx
        print "sti; pushf:"
        show_flags
        and ebx, IF_BIT
        expect ebx, IF_BIT
        verdict

        irq_disable
        pushfd
        pop ebx
        print "cli; pushf:"
        show_flags
        and ebx, IF_BIT
        expect ebx, 0
        verdict

        push 0x202                      ; IF=1 the popf way
        popfd
        pushfd
        pop ebx
        print "popf IF=1; pushf:"
        show_flags
        and ebx, IF_BIT
        expect ebx, IF_BIT
        verdict

        push 0x2                        ; IF=0 the popf way (a kernel's "restore flags")
        popfd
        pushfd
        pop ebx
        print "popf IF=0; pushf:"
        show_flags
        and ebx, IF_BIT
        expect ebx, 0
        verdict

        push 0x2 | IOPL3                ; IOPL=3: would let ring-3 code do port I/O
        popfd
        pushfd
        pop ebx
        print "popf IOPL=3; pushf:"
        show_flags
        and ebx, IOPL3
        expect ebx, IOPL3
        verdict

        push 0x2
        popfd
        pushfd
        pop ebx
        print "popf IOPL=0; pushf:"
        show_flags
        and ebx, IOPL3
        expect ebx, 0
        verdict

        push 0x2 | ARITH                ; the control: flags that are not sensitive
        popfd
        pushfd
        pop ebx
        push 0x2
        popfd
        print "popf OF SF ZF AF PF CF; pushf:"
        show_flags
        and ebx, ARITH
        expect ebx, ARITH
        verdict

        summary "flags"

        console_lib
        pm_data
