; kernel.s: a small kernel, to see the families together in one ordinary program. It sets up its GDT,
; IDT and TSS (pm_setup), a periodic timer (PIT channel 0 through the PIC, vector 0x20), and runs one
; task in ring 3 (entered with iretd) that makes system calls with `int 0x80`:
;
;   eax = 0 exit(ebx = code)     1 write(ebx = buffer, ecx = length)     2 ticks() -> eax
;   eax = 3 sleep(ebx = ticks)   anything else returns -1 and is reported
;
; The kernel prints a transcript ("kernel: ..."); the task's own lines come through write. Like real
; kernels it asserts that it runs at ring 0 (mov r, cs), checks that a system call came from ring 3 (the
; CS the CPU pushed), reads the tick count with local_irq_save/restore (pushf; cli; ...; popf) and sleeps
; with sti; hlt.
;
; Why it matters: a trap-and-emulate monitor can run all of the privileged part (lgdt lidt ltr, the
; PIC/PIT ports, cli sti hlt, the interrupt deliveries and the task's system calls) faithfully; what it
; cannot see is the unprivileged part. Predicted under trap-and-emulate: the first line differs (the
; kernel reads CS and finds RPL 3); the ticks() call leaves the virtual IF off (its popf is ignored),
; which the sleep's sti repairs; the task's own lines are unaffected. The exit code is 0x80 + the
; number of kernel checks that failed.
;
; Written with platform.inc: `-D PV` builds the paravirtual kernel (ring 1, hypercalls, an event-channel
; timer, evtchn_upcall_mask as IF). Its CPL check is relative to the platform's kernel ring (KRING: 0
; natively, 1 under Xen), and its system calls come through a trap gate, which Xen can make a direct
; trap (an interrupt gate needs the hypervisor to mask events on every call).
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 8
        .equ DIVISOR,  1000
        .ifdef PV
        .equ SYSGATE,  USERGATE         ; a DPL-3 trap gate: Xen's direct trap for int 0x80
        .else
        .equ SYSGATE,  0xEE00           ; present, DPL 3, 32-bit interrupt gate: syscalls run with IF=0
        .endif
        .equ NSYSCALLS, 4
        .equ MAXWRITE, 256

_start:
        plat_setup
        mov ebx, cs                     ; a kernel's first sanity check: am I at the kernel's ring?
        and ebx, 3
        sub ebx, KRING
        print "kernel: booting at cpl "
        print_dec ebx
        expect ebx, 0
        verdict

        plat_gate 0x80, syscall, SYSGATE
        plat_gate 13, general_protection, INTGATE
        plat_timer irq0, DIVISOR
        print "kernel: gdt, idt, tss loaded; timer every "
        print_dec DIVISOR
        print " instructions\n"
        print "kernel: starting the task in ring 3\n"
        enter_ring3 task, 0x202         ; IF=1: the timer interrupts the task

; --- the kernel's side ---------------------------------------------------------------------------------
irq0:
        push eax
        inc dword ptr [ticks]
        irq_eoi
        pop eax
        kiret

; syscall: frame eip, cs, eflags, esp, ss (from ring 3). eax = number; the result goes back in eax.
; DS is the task's flat data segment, good enough for the kernel's own data.
syscall:
        inc dword ptr [nsyscalls]
        movzx edx, word ptr [esp + 4]   ; the CS the CPU pushed: a system call must come from ring 3
        and edx, 3
        cmp edx, 3
        je syscall_from_user
        print "kernel: system call from ring "
        print_dec edx
        print " (expected 3)"
        mov byte ptr [con_bad], 1
        verdict
syscall_from_user:
        cmp eax, NSYSCALLS
        jae syscall_unknown
        call dword ptr [syscalls + eax * 4]
        kiret
syscall_unknown:
        print "kernel: unknown system call "
        print_dec eax
        print "\n"
        mov eax, 0xFFFFFFFF
        kiret

sys_write:                              ; ebx buffer, ecx length: checked before use (xv6 argptr)
        cmp ecx, MAXWRITE
        ja sys_write_bad
        mov edx, ebx
        add edx, ecx
        jc sys_write_bad
        mov esi, ebx
        con_write
        xor eax, eax
        ret
sys_write_bad:
        mov eax, 0xFFFFFFFF
        ret

sys_ticks:
        call read_ticks
        ret

; read_ticks: the tick count, read with interrupts off and the caller's IF restored afterwards.
read_ticks:
        irq_save                        ; local_irq_save
        mov eax, dword ptr [ticks]
        irq_restore                     ; local_irq_restore
        ret

sys_sleep:                              ; ebx ticks: halt until that many more have passed
        call read_ticks
        add ebx, eax
sys_sleep_wait:
        idle
        irq_disable
        cmp dword ptr [ticks], ebx
        jb sys_sleep_wait
        xor eax, eax
        ret

sys_exit:
        mov esi, ebx
        print "kernel: task exited with code "
        print_dec esi
        print " after "
        print_dec dword ptr [nsyscalls]
        print " system calls and "
        print_dec dword ptr [ticks]
        print " ticks"
        expect esi, 7
        cmp dword ptr [ticks], 8        ; 3 slept, about 6 during the sum
        jae sys_exit_ticks
        mov byte ptr [con_bad], 1
sys_exit_ticks:
        verdict
        summary "kernel"

general_protection:
        mov eax, dword ptr [esp]        ; error code
        mov ebx, dword ptr [esp + 8]    ; cs
        mov ecx, dword ptr [esp + 4]    ; eip
        print "kernel: #GP("
        print_hex16 eax
        print ") at "
        print_hex16 ebx
        print ":"
        print_hex32 ecx
        print ", stopping\n"
        exit GUEST_ID * 16 + 15

; --- the task (ring 3) ---------------------------------------------------------------------------------
; write_string "text": the write system call on a literal.
        .macro write_string text
        jmp ws_over\@
ws_str\@:
        .ascii \text
ws_end\@:
ws_over\@:
        mov eax, 1
        mov ebx, ws_str\@
        mov ecx, ws_end\@ - ws_str\@
        int 0x80
        .endm

task:
        mov ax, UDATA
        mov ds, ax
        mov es, ax
        write_string "task: hello from ring 3\n"
        mov eax, 2
        int 0x80
        mov edi, eax
        write_string "task: ticks() = "
        mov eax, edi
        call write_number
        write_string "\ntask: sleep(3)\n"
        mov eax, 3
        mov ebx, 3
        int 0x80
        mov eax, 2
        int 0x80
        mov edi, eax
        write_string "task: ticks() = "
        mov eax, edi
        call write_number
        write_string "\ntask: sum of 1..3000 = "
        xor eax, eax                    ; about 6,000 instructions in ring 3: the timer interrupts them
        mov ecx, 3000
task_sum:
        add eax, ecx
        loop task_sum
        call write_number
        write_string "\ntask: system call 99\n"
        mov eax, 99
        int 0x80
        mov edi, eax
        write_string "task: it returned "
        mov eax, edi
        call write_number
        write_string "\ntask: exit(7)\n"
        mov eax, 0
        mov ebx, 7
        int 0x80
        jmp task                        ; not reached

; write_number: eax as a signed decimal, through the write system call.
write_number:
        pushad
        mov edi, number_end
        mov esi, eax
        test eax, eax
        jns write_number_digits
        neg eax
write_number_digits:
        mov ebx, 10
write_number_next:
        xor edx, edx
        div ebx
        add dl, '0'
        dec edi
        mov byte ptr [edi], dl
        test eax, eax
        jnz write_number_next
        test esi, esi
        jns write_number_out
        dec edi
        mov byte ptr [edi], '-'
write_number_out:
        mov ebx, edi
        mov ecx, number_end
        sub ecx, edi
        mov eax, 1
        int 0x80
        popad
        ret

        console_lib
        pm_data
        .align 4
syscalls:
        .dword sys_exit, sys_write, sys_ticks, sys_sleep
ticks:          .dword 0
nsyscalls:      .dword 0
number:         .space 12
number_end:
