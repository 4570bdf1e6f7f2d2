; exits.s: a small kernel that turns paging on, flushes two TLB entries, asks the CPU who it is, reads the
; time stamp counter and says "ok". Under hardware-assisted virtualization some of these instructions
; leave the guest (a VM exit) and some do not, and which ones depends on the monitor's VT-x controls.
; Exercise 4 asks you to predict the exits, by reason, under two control sets (popek exercise show 4).
        .equ PGDIR, 0x180000            ; page directory
        .equ PGTAB, 0x181000            ; one page table: the first 4 MiB, identity-mapped
        .equ COM1, 0x3F8
        .equ EXIT, 0xF4

_start:
        mov edi, PGTAB                  ; fill the page table: page i -> frame i, present + writable
        mov eax, 0x003
        mov ecx, 1024
fill:
        mov dword ptr [edi], eax
        add eax, 0x1000
        add edi, 4
        dec ecx
        jnz fill
        mov dword ptr [PGDIR], PGTAB | 0x003
        mov eax, PGDIR
        mov cr3, eax                    ; the page directory
        mov eax, cr0
        or eax, 0x80000000
        mov cr0, eax                    ; paging on
        invlpg [0x100000]               ; flush two translations
        invlpg [0x180000]
        mov ebx, cr3                    ; read the page directory base back
        xor eax, eax
        cpuid                           ; leaf 0: the vendor
        rdtsc                           ; the time stamp counter
        mov dx, COM1
        mov al, 'o'
        out dx, al
        mov al, 'k'
        out dx, al
        mov al, 10
        out dx, al
        mov al, 0
        out EXIT, al
