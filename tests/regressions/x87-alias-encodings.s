; why: random images (popek bench images) ran `dd ce`, an x87 alias encoding (fxch4 st(6)) that Capstone
;      and objdump reject but every x87 FPU and Unicorn execute; bt took the undecodable bytes for #UD and
;      the runs parted. The decoder now knows the seven alias groups (fcom2 DC D0+i, fcomp3 DC D8+i, fxch4
;      DD C8+i, fcomp5 DE D0+i, fxch7 DF C8+i, fstp8 DF D0+i, fstp9 DF D8+i). st(0) ends 1, stored as 1.
; expect: exit exit-port 1
; expect: guest_instructions 10
; same-under: trap (no sensitive instruction: the FPU is the guest's)
_start:
        fld1
        fldz                            ; st(0) = 0, st(1) = 1
        .byte 0xdd, 0xc9                ; fxch4 st(1): st(0) = 1, st(1) = 0
        .byte 0xdc, 0xd1                ; fcom2 st(1): compares, pops nothing
        .byte 0xdf, 0xc9                ; fxch7 st(1): st(0) = 0, st(1) = 1
        .byte 0xdf, 0xc9                ; and back: st(0) = 1
        .byte 0xdf, 0xd1                ; fstp8 st(1): st(1) = 1, pop: st(0) = 1
        fistp dword ptr [value]
        mov eax, [value]
        out 0xf4, al
        hlt
        .align 4
value:
        .dword 0xffffffff
