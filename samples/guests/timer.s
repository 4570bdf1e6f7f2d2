; timer.s: PIC remapped to 0x20/0x28, PIT channel 0 in mode 2 with divisor 1000, IRQ 0 counted by a
; handler that sends EOI; the main loop spins with interrupts enabled until 10 ticks, then exits with
; the tick count. Written with platform.inc: `-D PV` builds the paravirtual version (an event-channel
; timer, the event mask as IF).
        .include "pm.inc"
_start:
        plat_setup
        plat_timer irq0, 1000
        xor ebx, ebx                    ; ticks
        xor esi, esi                    ; loop iterations
spin:
        irq_enable
        inc esi
        cmp ebx, 10
        jb spin
        irq_disable
        mov al, 'T'
        putc
        mov al, '\n'
        putc
        mov al, bl
        out EXIT, al

irq0:
        inc ebx
        push eax
        irq_eoi
        pop eax
        kiret

        pm_data
