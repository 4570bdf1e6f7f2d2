; pv/descriptors.s: a PV kernel's own GDT (PV only: -D PV, `--monitor pv`). HYPERVISOR_set_gdt installs a
; page of descriptors after validating each (a DPL-0 segment is refused with -EINVAL); the kernel loads its
; own ring-1 data segment; a store into the installed GDT page faults (the page is read-only while it is a
; GDT); HYPERVISOR_update_descriptor changes a descriptor (here the base of a data segment) after the same
; validation, and the next load sees the new base. Xen's flat selectors keep working throughout.
        .include "../pm.inc"
        .include "../console.inc"
        .equ GUEST_ID, 15
        .equ EINVAL, 22
        .equ GDT_PAGE, 0x210000
        .equ OWN_DATA, 0x11             ; entry 2, RPL 1: ring-1 data, base 0
        .equ WINDOW, 0x19               ; entry 3, RPL 1: ring-1 data, base moved by update_descriptor

_start:
        .ifndef PV
        print "pv/descriptors.s needs -D PV\n"
        exit GUEST_ID * 16 + 15
        .endif
        plat_setup
        plat_gate 13, probe_gp, INTGATE
        print "descriptors: a PV kernel's GDT through set_gdt and update_descriptor\n"
        ; a GDT with a ring-0 code segment in it: refused, nothing installed
        mov esi, bad_gdt
        mov ecx, 4 * 2
        call copy_gdt
        call install_gdt
        print "set_gdt with a DPL-0 code segment: "
        print_hex32 eax
        expect eax, -EINVAL
        verdict
        ; the good one
        mov esi, good_gdt
        mov ecx, 4 * 2
        call copy_gdt
        call install_gdt
        print "set_gdt with ring-1 code and data: "
        print_hex32 eax
        expect eax, 0
        verdict
        mov ax, OWN_DATA
        mov es, ax
        mov eax, es
        mov ebx, dword ptr es:[marker]
        print "mov es, 0011: es="
        print_hex16 eax
        print " reads "
        print_hex32 ebx
        expect eax, OWN_DATA
        expect ebx, 0x600DF00D
        verdict
        ; the GDT page is read-only now
        probe_arm store_done
        mov dword ptr [GDT_PAGE + 24], 0
store_done:
        print "store into the installed GDT:"
        print_probe
        expect dword ptr [probe_err], 0
        verdict
        ; update_descriptor: entry 3 gets base = marker (limit 4 KiB, ring-1 data)
        push ebx
        push esi
        push edi
        mov ebx, GDT_PAGE + 24
        xor ecx, ecx
        mov edx, ((marker & 0xFFFF) << 16) | 0x0FFF
        mov esi, (marker & 0xFF000000) | 0x0040B200 | ((marker >> 16) & 0xFF)
        hypercall HYPERVISOR_update_descriptor
        mov edi, eax
        mov ebx, GDT_PAGE + 24
        xor ecx, ecx
        mov edx, 0x0000FFFF
        mov esi, 0x00CF9200             ; DPL 0 data: refused
        hypercall HYPERVISOR_update_descriptor
        mov ecx, eax
        mov eax, edi
        pop edi
        pop esi
        pop ebx
        print "update_descriptor ring-1 window: "
        print_hex32 eax
        print ", ring-0 data: "
        print_hex32 ecx
        expect eax, 0
        expect ecx, -EINVAL
        verdict
        mov ax, WINDOW
        mov fs, ax
        mov ebx, dword ptr fs:[0]
        print "mov fs, 0019: fs:[0] reads "
        print_hex32 ebx
        expect ebx, 0x600DF00D
        verdict
        mov ax, KDATA
        mov es, ax
        mov eax, es
        print "Xen's flat data selector still loads: es="
        print_hex16 eax
        expect eax, KDATA
        verdict
        summary "descriptors"

; copy_gdt: ecx dwords from esi to GDT_PAGE (before it is installed: still writable).
copy_gdt:
        push edi
        mov edi, GDT_PAGE
        rep movsd
        pop edi
        ret

; install_gdt: HYPERVISOR_set_gdt(frames, 4); eax = result.
install_gdt:
        push ebx
        push ecx
        mov ebx, frames
        mov ecx, 4
        hypercall HYPERVISOR_set_gdt
        pop ecx
        pop ebx
        ret

        console_lib
        .align 8
good_gdt:
        .dword 0, 0
        .dword 0x0000FFFF, 0x00CFBA00   ; 0x09 code, DPL 1
        .dword 0x0000FFFF, 0x00CFB200   ; 0x11 data, DPL 1
        .dword 0x0000FFFF, 0x00CFB200   ; 0x19 data, DPL 1 (moved by update_descriptor)
bad_gdt:
        .dword 0, 0
        .dword 0x0000FFFF, 0x00CF9A00   ; code, DPL 0: not for a PV guest
        .dword 0x0000FFFF, 0x00CFB200
        .dword 0x0000FFFF, 0x00CFB200
frames: .dword GDT_PAGE >> 12
marker: .dword 0x600DF00D
        pm_data
