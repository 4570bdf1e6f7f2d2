; critical_section.s: POPF as "disable interrupts" (Robin & Irvine: POPF writes a sensitive register).
; A kernel with a periodic timer (PIT channel 0, IRQ 0 through the PIC at vector 0x20) guards a critical
; section three ways, 100 times each, and its timer handler counts the ticks that arrive *inside* a
; section (the guest sets a flag while it is in one). On the bare machine that count is always 0.
;
;   cli/sti:       cli; ...; sti                          (both privileged: a monitor sees both)
;   popf:          pushf; push 2; popf; ...; popf         (interrupts off and back on by popf alone)
;   cli/popf:      pushf; cli; ...; popf                  (Linux's local_irq_save / local_irq_restore)
;
; Why it matters: at CPL > 0 popf keeps IF silently. Under trap-and-emulate the monitor keeps a virtual
; IF that only cli and sti (which trap) change. So "push 2; popf" leaves the virtual IF on and the timer
; enters a section the kernel believes protected (a race that does not exist natively); and after
; "cli ... popf" the virtual IF stays off, so the kernel never takes another timer interrupt.
; Predicted under trap-and-emulate: the cli/sti line stays ok; the popf line shows inside > 0; the
; cli/popf line shows ticks after = 0 (and the tick totals of the last phase collapse).
;
; Written with platform.inc: `-D PV` builds the paravirtual version, where each guard is the same
; operation on evtchn_upcall_mask (a PV kernel's IF), which only the guest writes: no race, no lost ticks.
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID,  7
        .equ DIVISOR,   1000            ; an IRQ 0 every 1000 guest instructions
        .equ SECTIONS,  100
        .equ WORK,      150             ; loop iterations inside a section, and again outside

; phase NAME: reset the counters and print the phase's name.
        .macro phase name
        mov dword ptr [ticks], 0
        mov dword ptr [ticks_inside], 0
        mov dword ptr [ticks_after], 0
        irq_enable
        print \name
        mov ebp, SECTIONS
        .endm

; work: WORK iterations of a loop (clobbers ecx).
        .macro work
        mov ecx, WORK
work\@:
        loop work\@
        .endm

; result: the counts of the phase; inside must be 0 and, after a section, ticks must come back.
        .macro result
        irq_disable
        print " ticks="
        print_dec dword ptr [ticks]
        print " inside="
        print_dec dword ptr [ticks_inside]
        print " after="
        print_dec dword ptr [ticks_after]
        expect dword ptr [ticks_inside], 0
        cmp dword ptr [ticks_after], 0
        jne result_ok\@
        mov byte ptr [con_bad], 1
result_ok\@:
        verdict
        .endm

_start:
        plat_setup
        plat_timer irq0, DIVISOR

        print "critical_section: timer ticks that land inside a section the kernel protected\n"

        phase "cli/sti:"
cli_sti:
        irq_disable
        mov byte ptr [in_section], 1
        work
        mov byte ptr [in_section], 0
        irq_enable
        mov byte ptr [after_section], 1
        work
        mov byte ptr [after_section], 0
        dec ebp
        jnz cli_sti
        result

        phase "popf:"
popf_only:
        irq_push                        ; IF=1
        irq_push_disabled               ; "disable interrupts"
        irq_restore
        mov byte ptr [in_section], 1
        work
        mov byte ptr [in_section], 0
        irq_restore                     ; "enable them again"
        mov byte ptr [after_section], 1
        work
        mov byte ptr [after_section], 0
        dec ebp
        jnz popf_only
        result

        phase "cli/popf:"
cli_popf:
        irq_save                        ; local_irq_save: pushfd; cli
        mov byte ptr [in_section], 1
        work
        mov byte ptr [in_section], 0
        irq_restore                     ; local_irq_restore: popfd
        mov byte ptr [after_section], 1
        work
        mov byte ptr [after_section], 0
        dec ebp
        jnz cli_popf
        result

        summary "critical_section"

; irq0: count the tick, and whether it landed inside a section or in the work after one.
irq0:
        push eax
        inc dword ptr [ticks]
        cmp byte ptr [in_section], 0
        je irq0_outside
        inc dword ptr [ticks_inside]
irq0_outside:
        cmp byte ptr [after_section], 0
        je irq0_eoi
        inc dword ptr [ticks_after]
irq0_eoi:
        irq_eoi
        pop eax
        kiret

        console_lib
        pm_data
        .align 4
ticks:          .dword 0
ticks_inside:   .dword 0
ticks_after:    .dword 0
in_section:     .byte 0
after_section:  .byte 0
