; why: FIP at the two places bt lays an instruction out of line: an x87 instruction that is the last of
;      its page (bt moves it into glue, after a counted jmp), and an fnstenv that is the last of its page
;      (it closes its run, so its glue ends in an exit).
;      (trap diverges: the stored FCS is the CS selector, whose RPL shows the deprivileged ring, on
;      CPUs that store FCS, as Unicorn's does; later ones deprecate it and store 0: SDM Vol. 1, 8.1.8)
; expect: exit exit-port 254
; expect: state.ebx 0x101006
_start:
        mov esp, 0x90000
        fninit
        jmp near tail
        .org 0x100ffe
tail:   fld1                            ; the last instruction of its page: moved into glue by bt
        fnstenv [0x80000]               ; on the next page: a run of its own
        fldz
        jmp near end_page
        .org 0x101ffa
end_page:
        fnstenv [0x80100]               ; the last instruction of its page: it closes its run
        mov eax, dword ptr [0x8000c]
        mov ebx, dword ptr [0x8010c]
        out 0xf4, al
        hlt
