; paging: a kernel with its own page tables: a true page fault it handles itself, and a PTE it rewrites and
; uses. The test of a monitor's memory virtualization: under hvm without nested paging (vtx-2005) the
; monitor shadows these tables (CR3 load/store and invlpg exit, #PF exits, hidden faults are its own);
; with nested paging (kvm) none of this leaves the guest.
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 14
        .equ PD, 0x180000
        .equ PT, 0x181000
        .equ PAGE_A, 0x300000           ; mapped at start
        .equ PAGE_B, 0x301000           ; not present until the #PF handler maps it
        .equ FRAME2, 0x302000           ; another frame, mapped at PAGE_A by a PTE rewrite
_start:
        pm_setup
        set_gate 14, page_fault, INTGATE
        identity_map PD, PT             ; the first 4 MiB, PAGE_B not present
        mov dword ptr [PT + (PAGE_B >> 12) * 4], 0
        enable_paging PD
        print "paging: the kernel's own page tables, a true #PF, a PTE rewrite\n"
        mov dword ptr [PAGE_A], 0x11111111
        mov dword ptr [FRAME2], 0x22222222
        mov eax, cr3
        print "mov from cr3: "
        print_hex32 eax
        expect eax, PD
        verdict
        mov dword ptr [PAGE_B], 0x33333333      ; faults once: the handler maps PAGE_B
        mov eax, [PAGE_B]
        print "true #PF handled by the kernel: [PAGE_B]="
        print_hex32 eax
        print " faults="
        print_hex32 [faults]
        print " cr2="
        print_hex32 [fault_cr2]
        expect eax, 0x33333333
        expect dword ptr [faults], 1
        expect dword ptr [fault_cr2], PAGE_B
        verdict
        mov dword ptr [PT + (PAGE_A >> 12) * 4], FRAME2 + 3     ; PAGE_A now shows FRAME2
        invlpg [PAGE_A]
        mov eax, [PAGE_A]
        print "PTE rewritten, invlpg: [PAGE_A]="
        print_hex32 eax
        expect eax, 0x22222222
        verdict
        mov eax, cr2
        print "cr2 after the handler: "
        print_hex32 eax
        expect eax, PAGE_B
        verdict
        summary "paging"
page_fault:
        push eax
        inc dword ptr [faults]
        mov eax, cr2
        mov [fault_cr2], eax
        mov dword ptr [PT + (PAGE_B >> 12) * 4], PAGE_B + 3
        invlpg [PAGE_B]
        pop eax
        add esp, 4                      ; the error code
        iretd
        .align 4
faults: .dword 0
fault_cr2: .dword 0
        console_lib
        pm_data
