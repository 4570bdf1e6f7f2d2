; pv/multicall.s: HYPERVISOR_multicall, several hypercalls for one entry into the hypervisor (PV only:
; build with -D PV and run under `--monitor pv`). One batch sets the kernel stack and the trap table,
; writes a console line and asks for the version; it also carries an unknown operation and a nested
; multicall, which fail alone (-ENOSYS, -EINVAL) while the others complete. A second batch runs off the
; end of guest RAM: -EFAULT before any entry runs (the array is checked whole, as Xen copies it). Each result is one verdict line.
        .include "../pm.inc"
        .include "../console.inc"
        .equ GUEST_ID, 14
        .equ ENOSYS, 38
        .equ EINVAL, 22
        .equ EFAULT, 14

; result INDEX, NAME, WANTED: print entry INDEX's result and compare it with WANTED.
        .macro result index, name, wanted
        print \name
        print_hex32 dword ptr [batch + 32 * (\index) + 4]
        expect dword ptr [batch + 32 * (\index) + 4], \wanted
        verdict
        .endm

_start:
        .ifndef PV
        print "pv/multicall.s needs -D PV\n"
        exit GUEST_ID * 16 + 15
        .endif
        plat_setup
        print "multicall: six operations, one hypercall\n"
        push ebx
        mov ebx, batch
        mov ecx, 6
        hypercall HYPERVISOR_multicall
        pop ebx
        print "multicall returned "
        print_hex32 eax
        expect eax, 0
        verdict
        result 0, "stack_switch: ", 0
        result 1, "set_trap_table: ", 0
        result 2, "console_io: ", line_end - line
        result 3, "xen_version: ", 0x40011
        result 4, "unknown op 99: ", -ENOSYS
        result 5, "nested multicall: ", -EINVAL
        ; the trap table from the batch is in force: a #GP reaches probe_gp
        probe_arm gp_done
        cli                             ; privileged at ring 1: #GP(0) through the trap table
gp_done:
        print "cli after the batch: trap table entry"
        print_probe
        expect dword ptr [probe_err], 0
        verdict
        ; a batch whose second entry lies past the end of guest RAM
        mov esi, dword ptr [pv_shared]
        lea ebx, [esi + 4096 - 32]      ; the last 32 bytes of shared_info (unused), then RAM ends
        mov dword ptr [ebx], HYPERVISOR_xen_version
        mov dword ptr [ebx + 4], 0xFFFFFFFF
        mov dword ptr [ebx + 8], 0
        mov ecx, 2
        hypercall HYPERVISOR_multicall
        print "multicall off the end of RAM: "
        print_hex32 eax
        expect eax, -EFAULT
        mov esi, dword ptr [pv_shared]
        expect dword ptr [esi + 4096 - 28], 0xFFFFFFFF  ; nothing ran: the array is checked whole first
        verdict
        summary "multicall"

        console_lib
        .align 8
batch:  ; multicall_entry_t {op, result, args[6]}
        .dword HYPERVISOR_stack_switch, 0xFFFFFFFF, KDATA, KSTACK, 0, 0, 0, 0
        .dword HYPERVISOR_set_trap_table, 0xFFFFFFFF, traps, 0, 0, 0, 0, 0
        .dword HYPERVISOR_console_io, 0xFFFFFFFF, CONSOLEIO_write, line_end - line, line, 0, 0, 0
        .dword HYPERVISOR_xen_version, 0xFFFFFFFF, 0, 0, 0, 0, 0, 0
        .dword 99, 0xFFFFFFFF, 0, 0, 0, 0, 0, 0
        .dword HYPERVISOR_multicall, 0xFFFFFFFF, batch, 1, 0, 0, 0, 0
traps:  ; trap_info_t {vector, flags, cs, address}
        .byte 13, 4
        .word KCODE
        .dword probe_gp
        .dword 0, 0
line:   .ascii "console_io from inside the batch\n"
line_end:
        pm_data
