; why: a far return with imm16 >= 0x8000: ESP += 8 + the immediate zero-extended (SDM Vol. 2B RET), which
;      Unicorn sign-extends and the machine corrects. bt emulates retf in a callout and must agree (it was
;      not checked before). ESP ends 0x80000 + 8 + 0x8000.
; expect: exit exit-port 0
; expect: state.esp 0x88000
; expect: guest_instructions 6
_start:
        mov esp, 0x80000
        push cs
        push back
        retf 0x8000
back:   mov eax, esp
        out 0xf4, al
