; ticker.s: a small kernel that waits for 5 timer ticks, printing a dot on each, then says how many it
; counted and exits with that count. It is written for the bare machine, with every privileged
; instruction spelled out. Exercise 3 asks for its port to Xen's 32-bit PV ABI (popek exercise show 3).
        .include "../guests/pm.inc"
        .include "../guests/console.inc"
        .equ TICKS, 5
        .equ GUEST_ID, 10              ; console.inc tags its probe results with it

_start:
        pm_setup                        ; lgdt, segment reloads, ltr
        set_gate 0x20, tick, INTGATE    ; IRQ 0's entry in the IDT
        ; 8259 pair: ICW1..ICW4 (offsets 0x20/0x28), then only IRQ 0 unmasked
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
        mov al, 0xFE
        out 0x21, al
        mov al, 0xFF
        out 0xA1, al
        ; 8254 channel 0: mode 2, a tick every 2000 guest instructions
        mov al, 0x34
        out 0x43, al
        mov al, 2000 & 0xFF
        out 0x40, al
        mov al, 2000 >> 8
        out 0x40, al
        print "ticker: "
wait:
        sti                             ; interrupts on, and wait for one
        hlt
        cmp dword ptr [ticks], TICKS
        jb wait
        cli
        print " "
        print_dec dword ptr [ticks]
        print " ticks\n"
        mov al, byte ptr [ticks]
        out EXIT, al                    ; the exit port: the run ends with the tick count

tick:                                   ; IRQ 0
        inc dword ptr [ticks]
        push eax
        push edx
        mov al, '.'
        mov dx, COM1
        out dx, al
        mov al, 0x20                    ; EOI to the master 8259
        out 0x20, al
        pop edx
        pop eax
        iretd

ticks:  .dword 0                        ; counted by the handler
        pm_data
        console_lib
