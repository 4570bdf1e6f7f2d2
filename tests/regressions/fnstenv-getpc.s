; why: bt bug, found by popek bench images (image 705: guest RAM differed in three bytes an fnstenv wrote).
;      fnstenv stores FIP, the EIP of the last x87 instruction; under bt that instruction ran in the
;      translation cache, and the guest got the cache's address (0x2101017 here), which is also the GetPC
;      of encoded shellcode (fldz; fnstenv [esp-12]; pop ecx): it decoded itself from the wrong place. bt
;      now puts the guest's EIP into FIP before each store of the x87 state.
;      (trap diverges: the stored FCS is the CS selector, whose RPL shows the deprivileged ring, on
;      CPUs that store FCS, as Unicorn's does; later ones deprecate it and store 0: SDM Vol. 1, 8.1.8)
; expect: exit exit-port 66
; expect: state.ecx 0x100007
_start:
        mov esp, 0x90000
        fninit
here:   fldz                            ; the last x87 instruction: FIP is its EIP
        fnstenv [esp - 12]              ; the 28-byte environment; FIP lands at [esp]
        pop ecx                         ; the classic GetPC of encoded shellcode
        mov eax, 0x42
        cmp ecx, here
        je done
        mov eax, 0x99
done:   out 0xf4, al
        hlt
