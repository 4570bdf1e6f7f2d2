; timer.s: PIC remapped to 0x20/0x28, PIT channel 0 in mode 2 with divisor 1000, IRQ 0 counted by a
; handler that sends EOI; the main loop spins with interrupts enabled until 10 ticks, then exits with
; the tick count.
        .include "pm.inc"
_start:
        pm_setup
        set_gate 0x20, irq0, INTGATE
        ; 8259 pair: ICW1 (edge, cascade, ICW4), ICW2 offsets 0x20/0x28, ICW3 wiring, ICW4 8086 mode
        mov al, 0x11
        out 0x20, al
        out 0xA0, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x28
        out 0xA1, al
        mov al, 0x04
        out 0x21, al
        mov al, 0x02
        out 0xA1, al
        mov al, 0x01
        out 0x21, al
        out 0xA1, al
        mov al, 0xFE                    ; unmask IRQ 0 only
        out 0x21, al
        mov al, 0xFF
        out 0xA1, al
        ; 8254 channel 0, lobyte/hibyte, mode 2, divisor 1000
        mov al, 0x34
        out 0x43, al
        mov al, 1000 & 0xFF
        out 0x40, al
        mov al, 1000 >> 8
        out 0x40, al
        xor ebx, ebx                    ; ticks
        xor esi, esi                    ; loop iterations
spin:
        sti
        inc esi
        cmp ebx, 10
        jb spin
        cli
        mov al, 'T'
        putc
        mov al, '\n'
        putc
        mov al, bl
        out EXIT, al

irq0:
        inc ebx
        push eax
        mov al, 0x20                    ; non-specific EOI
        out 0x20, al
        pop eax
        iretd

        pm_data
