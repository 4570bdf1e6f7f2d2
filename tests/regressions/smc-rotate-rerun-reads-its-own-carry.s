; why: machine bug, corrected (bench images 843). An rcl/rcr whose store lands in its own block wrote its new
;      CF before Unicorn restarted the store, and the rerun rotated that CF in: another value stored (the
;      machine reported machine-error smc-rerun-stored-another-value), and rcr's OF (MSB xor the carry in)
;      wrong too. The carry the instruction read is a bit of what its first attempt stored; the machine
;      puts it back in CF before the rerun (corrected: carry-at-smc-rerun). Each rotate below rewrites its
;      own opcode and ModRM bytes. Before: esi 0x8c68, edx 0x101, edi 0x8698. Values from the SDM's RCL/RCR.
; expect: exit exit-port 0
; expect: guest_instructions 20
; expect: state.ebp 0x21a3
; expect: state.ebx 0x0
; expect: state.edx 0x1
; expect: state.esi 0xc68
; expect: state.edi 0x869c
; expect: state.ecx 0x3
; same-under: trap
_start:
        mov eax, rot1 + 1
        stc
rot1:   rcl word ptr [eax], 1
        setc bl
        seto bh
        movzx ebp, word ptr [rot1 + 1]
        mov eax, rot2 + 1
        clc
rot2:   rcr word ptr [eax], 1
        setc dl
        seto dh
        movzx esi, word ptr [rot2 + 1]
        mov eax, rot3 + 1
        mov cl, 3
        stc
rot3:   rcl word ptr [eax], cl
        movzx edi, word ptr [rot3 + 1]
        setc ch
        mov eax, 0
        out 0xf4, al
