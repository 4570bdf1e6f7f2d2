; bt_selfpatch.s: a kernel that patches its own code, each time after the code ran (so a translator has
; translated, and chained to, what is overwritten): the immediate of the very next instruction, a function
; called before and after, a conditional branch inside a running loop, an add inside a loop on its second
; iteration, a whole routine replaced with rep movsb, and a routine on a page of its own. The processor
; executes the new bytes in every case (x86 detects stores into code it is about to run); a translator must
; invalidate exactly the translations of the bytes written and translate them again. Natively every line
; is ok; exit code 0xD0.
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 13

_start:
        pm_setup
        set_gate 13, probe_gp, INTGATE

        ; 1. the next instruction's immediate, twice through the same code
        mov ecx, 2
        xor ebx, ebx
again1:
        mov byte ptr [p1 + 1], cl
p1:     mov al, 0x00
        add bl, al
        loop again1
        print "next instruction: "
        print_hex8 ebx
        expect bl, 3                    ; 2 + 1
        verdict

        ; 2. a function called, patched, called again
        call f
        mov esi, eax
        mov dword ptr [f + 1], 2
        call f
        print "patched function: "
        print_hex32 esi
        print " "
        print_hex32 eax
        expect esi, 1
        expect eax, 2
        verdict

        ; 3. a conditional branch flipped while its loop runs (jz <-> jnz each iteration)
        mov ecx, 6
        xor edx, edx
loop3:
        xor eax, eax                    ; ZF = 1
p3:     jz skip3
        inc edx                         ; counted when the branch is jnz
skip3:
        xor byte ptr [p3], 1            ; 0x74 <-> 0x75
        loop loop3
        print "flipped branch: "
        print_hex8 edx
        expect edx, 3
        verdict

        ; 4. an add patched inside its loop, on the second iteration
        mov ecx, 4
        xor ebx, ebx
loop4:
        cmp ecx, 3
        jne keep4
        mov byte ptr [p4 + 2], 10
keep4:
p4:     add ebx, 1
        loop loop4
        print "patched in the loop: "
        print_dec ebx
        expect ebx, 1 + 10 + 10 + 10
        verdict

        ; 5. a routine replaced whole with rep movsb
        call g
        mov esi, eax
        push esi
        mov esi, g_new
        mov edi, g
        mov ecx, g_new_end - g_new
        rep movsb
        pop esi
        call g
        print "replaced routine: "
        print_hex32 esi
        print " "
        print_hex32 eax
        expect esi, 0x600D
        expect eax, 0xBEEF
        verdict

        ; 6. a routine on a page of its own, patched from far away
        call far_page
        mov esi, eax
        mov byte ptr [far_page + 1], 0x77
        call far_page
        print "other page: "
        print_hex8 esi
        print " "
        print_hex8 eax
        expect esi, 0x11
        expect eax, 0x77
        verdict

        ; 7. data next to code written many times: no code changes, nothing to translate again
        mov ecx, 100
loop7:
        add dword ptr [counter7], 3
        loop loop7
        print "data beside code: "
        print_dec dword ptr [counter7]
        expect dword ptr [counter7], 300
        verdict
        summary "bt_selfpatch"

f:      mov eax, 1
        ret
g:      mov eax, 0x600D
        ret
        nop
        nop
g_new:  mov eax, 0xBEEF
        ret
g_new_end:
counter7: .dword 0

        console_lib
        pm_data
        .align 4096
far_page:
        mov al, 0x11
        movzx eax, al
        ret
