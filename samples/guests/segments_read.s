; segments_read.s: PUSH CS, PUSH SS, MOV r, CS, MOV r, SS (Robin & Irvine: instructions that reference
; the protection system). The low two bits of CS are the current privilege level, and of SS too; a kernel
; reads them to know where it runs (e.g. "was I called from user mode?", or an assert that it runs at
; ring 0) and takes a path accordingly.
;
; Why it matters: none of these instructions is privileged, so a kernel deprivileged to ring 3 by a
; trap-and-emulate monitor reads its real CS and SS, with RPL 3 (or whatever selectors the monitor gave
; it), and learns that it is not at ring 0: the "ring-0 path" check below takes the wrong branch.
; Predicted under trap-and-emulate: every kernel line differs; the ring-3 lines at the end, read by real
; user code, stay ok (the instructions are only wrong for the kernel, whose ring the monitor changed).
;
; `-D PV` (platform.inc) builds it for pv: the selectors are Xen's flat ring-1 ones, so the selector lines
; show e019/e021 with RPL 1 and check against them, and the "ring-0 path" line differs: a kernel ported to
; ring 1 must compare the RPL with its own ring (KRING), which is the porting work for this idiom.
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 3

; show_selector NAME: print "NAME: XXXX rpl=N" for the selector in ebx, check it is WANT.
        .macro show_selector name, want
        and ebx, 0xFFFF
        print \name
        print_hex16 ebx
        print " rpl="
        mov eax, ebx
        and eax, 3
        print_dec eax
        expect ebx, \want
        verdict
        .endm

        .macro ushow_selector name, want
        and ebx, 0xFFFF
        uprint \name
        uprint_hex16 ebx
        uprint " rpl="
        mov eax, ebx
        and eax, 3
        uprint_dec eax
        expect ebx, \want
        uverdict
        .endm

_start:
        plat_setup
        plat_gate 0x80, con_syscall, USERGATE
        plat_gate 0x81, back_in_kernel, USERGATE
        print "segments_read: the kernel reads CS and SS to learn its privilege level\n"

        push cs                         ; a 32-bit slot; only its low 16 bits are defined (SDM PUSH)
        pop ebx
        show_selector "push cs: ", KCODE

        mov ebx, cs
        show_selector "mov r, cs: ", KCODE

        push ss
        pop ebx
        show_selector "push ss: ", KDATA

        mov ebx, ss
        show_selector "mov r, ss: ", KDATA

        mov ebx, ds
        show_selector "mov r, ds: ", KDATA

        ; What a kernel does with it: branch on the RPL of CS.
        mov ebx, cs
        and ebx, 3
        print "kernel takes the "
        test ebx, ebx                   ; (print clobbers the flags)
        jnz wrong_path
        print "ring-0 path"
        jmp path_done
wrong_path:
        print "user-mode path"
path_done:
        expect ebx, 0
        verdict

        ; The same instructions in real user code, for contrast.
        enter_ring3 user

user:
        mov ax, UDATA
        mov ds, ax
        mov es, ax
        push cs
        pop ebx
        ushow_selector "ring 3, push cs: ", UCODE
        mov ebx, ss
        ushow_selector "ring 3, mov r, ss: ", UDATA
        int 0x81

back_in_kernel:                         ; ring 0 again, on the TSS stack; DS is still the flat UDATA
        summary "segments_read"

        console_lib
        pm_data
