; why: machine bug. rdtsc returns Unicorn's TSC, which follows the host's clock (measured on unicorn 2.1.4:
;      three runs of this guest gave three different EDX:EAX), so a guest that reads the TSC is not
;      deterministic natively, although the machine's time is otherwise instruction counts (DESIGN §3.3:
;      runs are deterministic; the PIT ticks on guest instructions). The generator leaves rdtsc out.
;      A fix would make RDTSC return the machine's instruction-based time.
; expect: deterministic
; expect: exit exit-port 0
; xfail: machine: rdtsc reads the host-driven TSC, so two native runs differ
; nondeterministic: rdtsc follows the host clock
_start:
        rdtsc
        mov ebx, eax
        mov ecx, edx
        mov eax, 0
        out 0xf4, al
