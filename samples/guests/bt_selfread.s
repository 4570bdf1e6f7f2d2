; bt_selfread.s: a kernel that reads its own code. A binary translator runs translations, not the guest's
; bytes, so every instruction it rewrites (calls, returns, jumps, conditional branches, the privileged and
; sensitive ones it turns into callouts) differs in the cache; a guest that reads its code must still see
; its own bytes. `probed` is executed first (so it has been translated), then its bytes are compared
; with their known encodings, and a checksum of the whole image is printed (the same natively and under
; any monitor that keeps guest memory the guest's). Natively every line is ok; exit code 0xA0.
        .include "pm.inc"
        .include "console.inc"
        .equ GUEST_ID, 10

_start:
        pm_setup
        set_gate 13, probe_gp, INTGATE
        call probed                             ; translate (and run) it first
        call probed

        print "call rel32: "
        mov eax, dword ptr [p_call]
        print_hex32 eax
        expect byte ptr [p_call], 0xE8
        expect dword ptr [p_call + 1], p_leaf - (p_call + 5)
        verdict
        print "jcc, jmp, ret: "
        mov eax, dword ptr [p_jz]
        print_hex32 eax
        expect word ptr [p_jz], 0x0074          ; jz +0
        expect byte ptr [p_jmp], 0xEB
        expect byte ptr [p_ret], 0xC3
        verdict
        print "sgdt, cli, sti, pushf, mov ax,cs: "
        mov eax, dword ptr [p_sgdt]
        print_hex32 eax
        expect dword ptr [p_sgdt], 0x0005010F + ((scratch & 0xFF) << 24)
        expect byte ptr [p_cli], 0xFA
        expect byte ptr [p_sti], 0xFB
        expect byte ptr [p_pushf], 0x9C
        expect dword ptr [p_movcs], 0xC88C66 + (0x90 << 24)
        verdict
        print "read through a computed pointer: "
        mov esi, probed
        mov ecx, probed_end - probed
        xor eax, eax
sum_probe:
        movzx edx, byte ptr [esi]
        add eax, edx
        rol eax, 1
        inc esi
        loop sum_probe
        print_hex32 eax
        mov ebx, eax
        mov esi, probed                         ; lodsd and rep cmpsb against a copy taken by rep movsb
        mov edi, copy
        mov ecx, probed_end - probed
        rep movsb
        mov esi, probed
        mov edi, copy
        mov ecx, probed_end - probed
        repe cmpsb
        expect ecx, 0
        verdict
        print "image checksum: "
        mov esi, _start
        mov ecx, (image_end - _start) / 4
        xor eax, eax
sum_image:
        xor eax, dword ptr [esi]
        rol eax, 3
        add esi, 4
        loop sum_image
        print_hex32 eax
        print "\n"
        summary "bt_selfread"

probed:
p_call: call p_leaf
p_jz:   jz p_jmp
p_jmp:  jmp short p_sgdt
p_sgdt: sgdt [scratch]
p_cli:  cli
p_sti:  sti
p_pushf: pushf
        add esp, 4
p_movcs: mov ax, cs
        nop
        ret
p_leaf:
        xor eax, eax
p_ret:  ret
probed_end:

        console_lib
        .align 4
scratch: .space 8
copy:   .space 64
        pm_data
        .align 4
image_end:
