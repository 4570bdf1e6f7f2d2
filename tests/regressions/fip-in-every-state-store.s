; why: the stores of fnstenv-getpc.s in every form that writes FIP: fnstenv with 32- and 16-bit operand
;      size, fnsave, fxsave, one after a branch (another unit under bt), and a FIP the guest loaded itself
;      with fldenv, which must come back as it was. Natively the last store holds the fld1's EIP.
;      (trap diverges: the stored FCS is the CS selector, whose RPL shows the deprivileged ring, on
;      CPUs that store FCS, as Unicorn's does; later ones deprecate it and store 0: SDM Vol. 1, 8.1.8)
; expect: exit exit-port 7
; expect: state.eax 0x100007
_start:
        mov esp, 0x90000
        fninit
        fld1                            ; FIP: here
        fnstenv [0x80000]               ; 28 bytes, FIP at +12
        fldpi
        .byte 0x66
        fnstenv [0x80020]               ; 14 bytes (16-bit operand size), FIP at +6
        fldz
        fnsave [0x80040]                ; 108 bytes, then fninit
        fld1
        fxsave [0x80100]                ; 512 bytes, FIP at +8
        mov ecx, 3
again:  fldl2e
        dec ecx
        jnz again
        fstp st(0)
        fnstenv [0x80400]               ; right after a branch: in another unit
        fldenv [0x80000]                ; FIP loaded from memory: a guest value, kept
        fnstenv [0x80440]
        mov eax, dword ptr [0x8000c]
        mov ebx, dword ptr [0x8010c]    ; (fxsave's FCS slot)
        out 0xf4, al
        hlt
