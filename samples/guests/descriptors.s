; descriptors.s: LAR, LSL, VERR and VERW (Robin & Irvine: instructions that reference the protection
; system). A kernel asks the CPU about selectors of its own GDT: access rights, limit, readable, writable.
;
; Why it matters: the answer depends on the CPL and on the selector's RPL (a descriptor is visible only
; when DPL >= max(CPL, RPL)), and the instructions do not trap: they report failure in ZF. A kernel
; deprivileged to ring 3 gets "fail" for its own ring-0 segments, and, where a monitor runs it on its own
; descriptors, the monitor's access rights and limits instead of the guest's. Predicted under
; trap-and-emulate: the ring-0 code and data lines (0008, 0010) differ at lar; the RPL-3 and ring-3
; lines, which already fail or succeed for ring-3 reasons, stay ok; the TSS line differs if the monitor
; gives the real TR its own TSS selector. The selectors 000b and 0013 show RPL alone making a ring-0
; kernel's own descriptor invisible.
;
; Two details: the guest sets the accessed bit of its code and data descriptors first (as kernels do, so
; the CPU never writes the GDT), and masks LAR's result with 0x00F0FF00 because bits 19:16 (the limit's
; high nibble) are undefined in the SDM (LAR: "masked by 00FxFF00H").
;
; `-D PV` (platform.inc) builds it for pv, where the kernel's segments are Xen's flat ring-1 ones in the
; hypervisor's part of the GDT and pm.inc's table is never loaded: the rows show what a PV kernel's lar
; and lsl really see (DPL 1 access rights; no ring-1 data at 0x39 and no TSS at 0x28 of its own).
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 4
        .equ AR_MASK,  0x00F0FF00
        .equ YES, 1
        .equ NO,  0

; row SELECTOR, "NAME", LAR_OK, AR, LSL_OK, LIMIT, VERR, VERW: what a ring-0 kernel expects. 64 bytes.
        .macro row sel, name, lar_ok, ar, lsl_ok, limit, verr, verw
        .dword \sel, \lar_ok, \ar, \lsl_ok, \limit, \verr, \verw, 0
        .asciz \name
        .align 64
        .endm
        .equ R_SEL, 0
        .equ R_LAR_OK, 4
        .equ R_AR, 8
        .equ R_LSL_OK, 12
        .equ R_LIMIT, 16
        .equ R_VERR, 20
        .equ R_VERW, 24
        .equ R_NAME, 32

_start:
        plat_setup
        mov ecx, 1                      ; accessed bit in every code/data descriptor (entries 1-4, 6, 7)
preset:
        cmp ecx, TSSSEL / 8
        je preset_next
        or dword ptr [pm_gdt + ecx * 8 + 4], 0x100
preset_next:
        inc ecx
        cmp ecx, 8
        jb preset

        print "descriptors: LAR LSL VERR VERW on the kernel's own GDT, at CPL 0\n"
        mov ebp, table
next_row:
        cmp dword ptr [ebp + R_SEL], 0xFFFFFFFF
        je rows_done
        mov ecx, dword ptr [ebp + R_SEL]
        print_hex16 ecx
        print " "
        lea esi, [ebp + R_NAME]
        call con_puts

        ; lar: ZF=1 and the access rights, or ZF=0 and the destination unchanged
        mov eax, 0
        lar eax, ecx
        setz bl
        movzx ebx, bl
        and eax, AR_MASK
        print ": lar "
        call show_result
        expect ebx, dword ptr [ebp + R_LAR_OK]
        test ebx, ebx
        jz lar_checked
        expect eax, dword ptr [ebp + R_AR]
lar_checked:

        mov eax, 0
        lsl eax, ecx
        setz bl
        movzx ebx, bl
        print ", lsl "
        call show_result
        expect ebx, dword ptr [ebp + R_LSL_OK]
        test ebx, ebx
        jz lsl_checked
        expect eax, dword ptr [ebp + R_LIMIT]
lsl_checked:

        verr cx
        setz bl
        movzx ebx, bl
        print ", verr "
        print_dec ebx
        expect ebx, dword ptr [ebp + R_VERR]

        verw cx
        setz bl
        movzx ebx, bl
        print ", verw "
        print_dec ebx
        expect ebx, dword ptr [ebp + R_VERW]
        verdict

        add ebp, 64
        jmp next_row
rows_done:
        summary "descriptors"

; show_result: eax if ebx (ZF) is 1, else "fail".
show_result:
        test ebx, ebx
        jz show_fail
        print_hex32 eax
        ret
show_fail:
        print "fail"
        ret

        console_lib
        pm_data

        .align 64
table:
        row KCODE,      "ring-0 code",          YES, 0x00C09B00, YES, 0xFFFFFFFF, YES, NO
        row KDATA,      "ring-0 data",          YES, 0x00C09300, YES, 0xFFFFFFFF, YES, YES
        row KCODE | 3,  "ring-0 code, RPL 3",   NO,  0,          NO,  0,          NO,  NO
        row KDATA | 3,  "ring-0 data, RPL 3",   NO,  0,          NO,  0,          NO,  NO
        row R1DATA,     "ring-1 data",          YES, 0x00C0B300, YES, 0xFFFFFFFF, YES, YES
        row UCODE,      "ring-3 code",          YES, 0x00C0FB00, YES, 0xFFFFFFFF, YES, NO
        row UDATA,      "ring-3 data",          YES, 0x00C0F300, YES, 0xFFFFFFFF, YES, YES
        row TSSSEL,     "TSS (busy)",           YES, 0x00008B00, YES, 0x00000067, NO,  NO
        row 0x40,       "beyond the GDT limit", NO,  0,          NO,  0,          NO,  NO
        row 0,          "null",                 NO,  0,          NO,  0,          NO,  NO
        .dword 0xFFFFFFFF
