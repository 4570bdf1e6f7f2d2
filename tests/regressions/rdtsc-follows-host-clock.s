; why: machine bug, corrected. rdtsc returned Unicorn's TSC, which follows the host's clock (measured on
;      unicorn 2.1.4: three runs of this guest gave three different EDX:EAX), so a guest that read the TSC
;      was not deterministic natively, although the machine's time is otherwise instruction counts (the
;      PIT ticks on guest instructions). The machine now puts its clock into EDX:EAX (quirks:
;      tsc-from-host-clock): the rdtsc is instruction 1 and sees itself counted, as an `in` from the PIT does.
; expect: deterministic
; expect: exit exit-port 0
; expect: state.ebx 0x1
; expect: state.ecx 0x0
; same-under: trap
_start:
        rdtsc
        mov ebx, eax
        mov ecx, edx
        mov eax, 0
        out 0xf4, al
