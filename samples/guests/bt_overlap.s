; bt_overlap.s: code that is executed from two different instruction boundaries. The five bytes at
; `hidden` are `mov eax, 0x02EB4040` when entered at `hidden`, and `inc eax; inc eax; jmp hidden+7` when
; entered one byte later. A binary translator decodes from wherever control arrives, so it must keep two
; translations of the same bytes, keyed by the address control arrived at, and never mistake one for the
; other. Both orders are run: the middle first, then the start; then the start first (fresh copies of the
; bytes, in `second`), then the middle. Natively every line is ok; exit code 0x90.
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 9

_start:
        pm_setup
        set_gate 13, probe_gp, INTGATE

        ; --- middle first, then the whole instruction ---
        xor eax, eax
        xor ebx, ebx
        mov esi, 0                      ; pass number
        jmp hidden + 1
hidden:
        .byte 0xB8, 0x40, 0x40, 0xEB, 0x02      ; mov eax, 0x02EB4040 | inc eax; inc eax; jmp +2
        inc ebx                                 ; skipped when entered in the middle
        inc ebx
        inc esi
        cmp esi, 1
        jne first_done
        mov edi, eax                    ; after the middle entry: eax = 2, ebx = 0
        mov ebp, ebx
        jmp hidden
first_done:
        print "middle then start: "
        print_hex32 edi
        print " "
        print_hex32 ebp
        print " "
        print_hex32 eax
        print " "
        print_hex32 ebx
        expect edi, 2
        expect ebp, 0
        expect eax, 0x02EB4040
        expect ebx, 2
        verdict

        ; --- the whole instruction first, then the middle ---
        xor eax, eax
        xor ebx, ebx
        mov esi, 0
second:
        .byte 0xB8, 0x40, 0x40, 0xEB, 0x02
        inc ebx
        inc ebx
        inc esi
        cmp esi, 2
        je second_done
        mov edi, eax                    ; after the whole instruction: eax = 0x02EB4040, ebx = 2
        mov ebp, ebx
        xor eax, eax
        jmp second + 1
second_done:
        print "start then middle: "
        print_hex32 edi
        print " "
        print_hex32 ebp
        print " "
        print_hex32 eax
        print " "
        print_hex32 ebx
        expect edi, 0x02EB4040
        expect ebp, 2
        expect eax, 2
        expect ebx, 2
        verdict

        ; --- an indirect jump computed into the middle of a call's rel32 ---
        mov eax, inner + 1
        xor ecx, ecx
        jmp eax
inner:
        .byte 0x05, 0x41, 0x41, 0x41, 0x41      ; add eax, 0x41414141 | inc ecx x4
        print "indirect into an immediate: "
        print_hex32 ecx
        expect ecx, 4
        verdict
        summary "bt_overlap"

        console_lib
        pm_data
