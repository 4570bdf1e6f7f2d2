; segments_load.s: MOV and POP to DS, ES and SS (Robin & Irvine: instructions that reference the
; protection system). A kernel loads its own ring-0 selectors, and selectors whose RPL or DPL differ from
; its CPL, and reads back what got loaded; a #GP handler (probe_gp in console.inc) records the error code
; and skips the load.
;
; Why it matters: the checks are made against the CPL. Data segments need DPL >= max(CPL, RPL); the
; stack segment needs RPL = DPL = CPL. None of these loads is privileged, so a kernel deprivileged to
; ring 3 gets ring-3 answers without the monitor seeing anything: a ring-3 stack segment becomes loadable
; (a ring-0 kernel must get #GP for it), its ring-1 and ring-0 selectors fault or load something else.
; Predicted under trap-and-emulate (ring compression: the kernel's descriptors usable at CPL 3): the
; first line that differs is "mov ds, 0013", which loads instead of faulting, and "mov ss, 0023" loads a
; ring-3 stack into a kernel; if the monitor does not let the kernel load its ring-0 data at all, the
; first is "mov ds, 0010". Lines that only involve ring-3 descriptors stay ok.
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 5
        .equ NO_FAULT, 0xFFFFFFFF

; try_load INSN, SREG, SELECTOR, WANT, WANT_ERR: `mov SREG, ax` or `pop SREG` with SELECTOR; WANT is
; the selector that must be in SREG afterwards, WANT_ERR the #GP error code (NO_FAULT for none).
; Afterwards DS, ES, SS and ESP are put back, then the line is printed.
        .macro try_load insn, sreg, sel, want, want_err
        mov dword ptr [saved_esp], esp
        mov ax, \sel
        push eax
        probe_arm back\@
        .ifdef IS_MOV_\insn
        mov \sreg, ax
        .else
        pop \sreg
        .endif
back\@:
        probe_disarm
        mov ebx, \sreg
        and ebx, 0xFFFF
        mov ax, KDATA
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov esp, dword ptr [saved_esp]
        print "\insn \sreg, "
        print_hex16 \sel
        print ":"
        print_probe
        print " \sreg="
        print_hex16 ebx
        expect ebx, \want
        expect dword ptr [probe_err], \want_err
        verdict
        .endm
        .equ IS_MOV_mov, 1

_start:
        pm_setup
        set_gate 13, probe_gp, INTGATE
        print "segments_load: a ring-0 kernel loads DS, ES, SS with its own and with foreign selectors\n"

        try_load mov, ds, KDATA,      KDATA,  NO_FAULT  ; its own ring-0 data
        try_load mov, es, KDATA,      KDATA,  NO_FAULT
        try_load mov, ds, UDATA,      UDATA,  NO_FAULT  ; DPL 3 data: any CPL may use it
        try_load mov, es, R1DATA,     R1DATA, NO_FAULT  ; DPL 1 >= max(CPL 0, RPL 1)
        try_load mov, ds, KDATA | 3,  KDATA,  KDATA     ; RPL 3 > DPL 0: #GP, DS unchanged
        try_load mov, es, KDATA | 1,  KDATA,  KDATA     ; RPL 1 > DPL 0
        try_load mov, ds, 0,          0,      NO_FAULT  ; the null selector is allowed in DS
        try_load mov, ds, KCODE,      KCODE,  NO_FAULT  ; readable code may be read through DS
        try_load mov, ds, TSSSEL,     KDATA,  TSSSEL    ; a TSS is not a data segment
        try_load mov, ss, KDATA,      KDATA,  NO_FAULT  ; its own ring-0 stack
        try_load mov, ss, UDATA,      KDATA,  UDATA & ~3 ; a stack needs DPL = CPL
        try_load mov, ss, KDATA | 3,  KDATA,  KDATA     ; and RPL = CPL
        try_load mov, ss, R1DATA,     KDATA,  R1DATA & ~3
        try_load mov, ss, 0,          KDATA,  0         ; no null stack
        try_load mov, ss, KCODE,      KDATA,  KCODE     ; code is not a writable stack
        try_load pop, ds, KDATA,      KDATA,  NO_FAULT
        try_load pop, es, KDATA | 3,  KDATA,  KDATA
        try_load pop, ss, KDATA,      KDATA,  NO_FAULT
        try_load pop, ss, UDATA,      KDATA,  UDATA & ~3

        summary "segments_load"

        console_lib
        pm_data
        .align 4
saved_esp:
        .dword 0
