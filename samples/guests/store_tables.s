; store_tables.s: SGDT, SIDT, SLDT, STR and SMSW (Robin & Irvine: instructions that read sensitive
; registers). A kernel loads its own GDT, IDT, LDT, task register and CR0 at addresses it chose, then
; stores each one back and compares with what it loaded.
;
; Why it matters: the loads (lgdt lidt lldt ltr mov cr0) are privileged, so a trap-and-emulate monitor
; sees them and can keep virtual copies; the stores are not privileged, so a deprivileged kernel executes
; them directly and gets the *real* registers, which point at the monitor's own tables (outside guest RAM)
; and its own TSS. That is the Red Pill / "No Pill" VM test, and it breaks equivalence (Popek-Goldberg
; Theorem 1). `mov eax, cr0` is the contrast: it is privileged, so a monitor emulates it correctly, while
; smsw, reading the same register, is not. Predicted under trap-and-emulate: "sgdt" (the first line to
; differ) and "sidt" show the monitor's tables; "sldt" and "str" differ unless the monitor gives the real
; LDTR and TR the guest's selector values; "smsw" lacks MP/NE unless the monitor copies them into the
; real CR0; "mov from cr0" stays ok.
;
; Tables (all in guest RAM, at fixed addresses so the expected values are constants):
;   GDT 0x1000 (5 entries: null, 0x08 code, 0x10 data, 0x18 LDT, 0x20 TSS; limit 0x27)
;   IDT 0x1800 (32 gates, limit 0xff)   LDT 0x2000 (2 entries, limit 0x0f)   TSS 0x2800 (limit 0x67)
;   CR0 = boot value | MP | NE | WP | AM = 0x00050033 (smsw sees only the low 16 bits: 0x0033)
;
; `-D PV` builds what a PV kernel can do instead (platform.inc): HYPERVISOR_set_gdt with ring-1 descriptors
; at the same GDT address (no LDT or TSS descriptor: Xen refuses system descriptors), its traps through
; set_trap_table, no LDT, TR or CR0 of its own (mov from cr0 is probed: a #GP at ring 1). The stores then
; show the hypervisor's tables: paravirtualization does not hide them, a PV kernel simply must not use them.
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 1
        .equ GDT_AT,   0x1000
        .equ IDT_AT,   0x1800
        .equ LDT_AT,   0x2000
        .equ TSS_AT,   0x2800
        .equ GDT_LIMIT, 5 * 8 - 1
        .equ IDT_LIMIT, 32 * 8 - 1
        .equ LDT_SEL,  0x18
        .equ TSS_SEL,  0x20
        .equ CR0_SET,  0x00050022       ; AM | WP | NE | MP: harmless with paging and the FPU unused

_start:
        .ifdef PV
        plat_setup
        mov esi, pv_gdt_template
        mov edi, GDT_AT
        mov ecx, (GDT_LIMIT + 1) / 4
        rep movsd
        push ebx
        mov ebx, pv_gdt_frames
        mov ecx, (GDT_LIMIT + 1) / 8
        hypercall HYPERVISOR_set_gdt
        pop ebx
        plat_gate 13, probe_gp, INTGATE
        plat_gate 6, undefined, INTGATE
        .else
        ; --- set up: copy the GDT and LDT templates to their addresses, build the IDT, load everything ---
        mov esi, gdt_template
        mov edi, GDT_AT
        mov ecx, (GDT_LIMIT + 1) / 4
        rep movsd
        mov esi, ldt_template
        mov edi, LDT_AT
        mov ecx, 16 / 4
        rep movsd
        mov edi, IDT_AT                 ; 32 not-present gates, then #UD and #GP
        mov ecx, (IDT_LIMIT + 1) / 4
        xor eax, eax
        rep stosd
        mov edi, TSS_AT
        mov ecx, 104 / 4
        rep stosd
        mov dword ptr [TSS_AT + 4], KSTACK
        mov dword ptr [TSS_AT + 8], KDATA
        mov word ptr [TSS_AT + 102], 104
        mov eax, probe_gp
        mov edx, IDT_AT + 13 * 8
        call set_gate_at
        mov eax, undefined
        mov edx, IDT_AT + 6 * 8
        call set_gate_at

        lgdt [gdtr_loaded]
        jmp far KCODE:reloaded
reloaded:
        mov ax, KDATA
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov esp, KSTACK
        lidt [idtr_loaded]
        mov ax, LDT_SEL
        lldt ax
        mov ax, TSS_SEL
        ltr ax
        mov eax, cr0
        or eax, CR0_SET
        mov cr0, eax
        .endif

        print "store_tables: SGDT SIDT SLDT STR SMSW read back what the kernel loaded\n"
        .ifdef PV
        print "loaded: gdt base=00001000 limit=0027 by set_gdt, a trap table; no idt, ldt, tr or cr0 of its own\n"
        .else
        print "loaded: gdt base="
        print_hex32 GDT_AT
        print " limit="
        print_hex16 GDT_LIMIT
        print ", idt base="
        print_hex32 IDT_AT
        print " limit="
        print_hex16 IDT_LIMIT
        print ", ldtr="
        print_hex16 LDT_SEL
        print ", tr="
        print_hex16 TSS_SEL
        print ", cr0="
        mov eax, cr0
        print_hex32 eax
        print "\n"
        .endif

        ; --- sgdt: 6 bytes, limit then base ---
        mov dword ptr [stored], 0xDEADBEEF      ; sentinels: a store that writes nothing shows
        mov dword ptr [stored + 4], 0xDEADBEEF
        sgdt [stored]
        movzx ebx, word ptr [stored]
        mov ecx, dword ptr [stored + 2]
        print "sgdt: base="
        print_hex32 ecx
        print " limit="
        print_hex16 ebx
        expect ecx, GDT_AT
        expect ebx, GDT_LIMIT
        verdict

        ; --- sidt ---
        mov dword ptr [stored], 0xDEADBEEF
        mov dword ptr [stored + 4], 0xDEADBEEF
        sidt [stored]
        movzx ebx, word ptr [stored]
        mov ecx, dword ptr [stored + 2]
        print "sidt: base="
        print_hex32 ecx
        print " limit="
        print_hex16 ebx
        expect ecx, IDT_AT
        expect ebx, IDT_LIMIT
        verdict

        ; --- sldt: into memory, a 16-bit store (the SLDT-sentinel idiom fills the word around it) ---
        mov dword ptr [stored], 0xDEADBEEF
        sldt word ptr [stored]
        mov ebx, dword ptr [stored]
        print "sldt: "
        print_hex16 ebx
        print " (stored dword "
        print_hex32 ebx
        print ")"
        expect ebx, 0xDEAD0000 | LDT_SEL
        verdict

        ; --- str: into a register ---
        mov eax, 0xDEADBEEF
        str ax
        mov ebx, eax
        print "str: "
        print_hex16 ebx
        expect bx, TSS_SEL
        verdict

        ; --- smsw: the low 16 bits of CR0 ---
        mov eax, 0xDEADBEEF
        smsw ax
        mov ebx, eax
        print "smsw: "
        print_hex16 ebx
        expect bx, (BOOT_CR0 | CR0_SET) & 0xFFFF
        verdict

        ; --- mov from cr0: the privileged way to read the same register ---
        .ifdef PV
        probe_arm cr0_read                      ; privileged at ring 1: #GP, not emulated
        xor ebx, ebx
        mov ebx, cr0
cr0_read:
        print "mov from cr0: "
        print_hex32 ebx
        print_probe
        .else
        mov ebx, cr0
        print "mov from cr0: "
        print_hex32 ebx
        .endif
        expect ebx, BOOT_CR0 | CR0_SET
        verdict

        summary "store_tables"

; set_gate_at: a present DPL-0 32-bit interrupt gate to KCODE:eax, written at edx.
set_gate_at:
        mov word ptr [edx], ax
        mov word ptr [edx + 2], KCODE
        mov word ptr [edx + 4], INTGATE
        shr eax, 16
        mov word ptr [edx + 6], ax
        ret

undefined:
        print "unexpected #UD\n"
        exit GUEST_ID * 16 + 15

        .equ BOOT_CR0, 0x11             ; PE | ET, DESIGN.md section 3.3

        console_lib
        plat_lib

        .align 8
gdt_template:
        .dword 0, 0
        .dword 0x0000FFFF, 0x00CF9A00   ; 0x08 code, DPL 0
        .dword 0x0000FFFF, 0x00CF9200   ; 0x10 data, DPL 0
        .word  0x000F, LDT_AT & 0xFFFF  ; 0x18 LDT, limit 15
        .byte  (LDT_AT >> 16) & 0xFF, 0x82, 0x00, LDT_AT >> 24
        .word  0x0067, TSS_AT & 0xFFFF  ; 0x20 TSS (32-bit, available), limit 103
        .byte  (TSS_AT >> 16) & 0xFF, 0x89, 0x00, TSS_AT >> 24
        .ifdef PV
pv_gdt_template:                        ; the same slots, as a PV kernel may have them
        .dword 0, 0
        .dword 0x0000FFFF, 0x00CFBA00   ; 0x08 code, DPL 1
        .dword 0x0000FFFF, 0x00CFB200   ; 0x10 data, DPL 1
        .dword 0, 0                     ; (no LDT descriptor)
        .dword 0, 0                     ; (no TSS descriptor)
pv_gdt_frames:
        .dword GDT_AT >> 12
        .endif
ldt_template:
        .dword 0, 0
        .dword 0x0000FFFF, 0x00CF9200   ; LDT selector 0x0c: data, DPL 0
gdtr_loaded:
        .word GDT_LIMIT
        .dword GDT_AT
idtr_loaded:
        .word IDT_LIMIT
        .dword IDT_AT
        .align 4
stored:
        .space 8
