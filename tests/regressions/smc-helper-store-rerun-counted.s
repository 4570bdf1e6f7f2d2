; why: machine bug, found by popek bench images (image 1417: native counted one instruction more than bt).
;      fnstenv makes its seven stores in a helper. Its first store lands just before the running block,
;      its second in the block: Unicorn drops the block and runs fnstenv again, alone, and the count hook
;      fires twice. The machine told a rerun by the last store seen against the first of the rerun, which
;      differ for an instruction with several stores, so this rerun stayed counted. It now compares the
;      first stores of the two attempts. Counted: 6 before the nops, 24 nops, fnstenv and the out.
; expect: exit exit-port 55
; expect: guest_instructions 32
_start:
        mov esp, 0x80000
        fninit
        fld1
        mov ecx, area
        mov eax, 0x37
        jmp go
        .align 16
area:   .space 4                        ; fnstenv's first store (FCW): outside the block
go:     .byte 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90    ; the block: 24 nops, where the
        .byte 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90    ; environment's other 24 bytes land
        .byte 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90
        fnstenv [ecx]
        out 0xf4, al
        hlt
