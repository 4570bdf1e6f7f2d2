; whoami.s: a small domain for t1-full.toml. It prints the first line of its machine description
; (mach_desc: "domain NAME") and its vCPU id (cpu_myid), and exits. sun4v only (-D SUN4V).
        .include "../guests/pm.inc"
        .include "../guests/console.inc"
        .equ GUEST_ID, 3
        .equ HV_MACH_DESC, 0x01
        .equ HV_CPU_MYID, 0x16

_start:
        mov esp, 0x8000
        mov ebx, desc
        mov ecx, 128
        hvcall HV_MACH_DESC
        mov esi, desc
        xor ecx, ecx
first_line:
        cmp byte ptr [esi + ecx], 10
        je found
        inc ecx
        jmp first_line
found:
        con_write
        hvcall HV_CPU_MYID              ; ecx: the vCPU id in the domain
        print ": vcpu "
        print_dec ecx
        print "\n"
        exit 0

        console_lib
desc:   .space 128
        pm_data
