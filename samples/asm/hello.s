; hello.s - the smallest complete guest for the popek bare machine (DESIGN.md section 3.3).
;
; It does what every protected-mode kernel does first: builds its own GDT, loads it, reloads CS with
; a far jump and the data segment registers with moves, then prints "hello" on COM1 and writes its
; exit code to port 0xF4. Under a monitor, lgdt, the far jump and the segment moves are exactly the
; instructions that trap, get translated or must be replaced by hypercalls.
;
;   popek asm samples/asm/hello.s --listing -      # flat image at 0x00100000 plus a listing
;   popek asm samples/asm/hello.s -D EXIT_CODE=3   # the same guest exiting with code 3

        .equ COM1,      0x3F8           ; serial port: a byte written here is console output
        .equ EXIT_PORT, 0xF4            ; writing a byte here ends the run with that exit code
        .equ CODE_SEL,  0x08            ; GDT entry 1
        .equ DATA_SEL,  0x10            ; GDT entry 2

        .ifndef EXIT_CODE
        .equ EXIT_CODE, 0
        .endif

_start:
        cli
        lgdt [gdt_descriptor]
        jmp far CODE_SEL:reload_cs      ; CS can only change through a far transfer

reload_cs:
        mov ax, DATA_SEL
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        mov ss, ax
        mov esp, 0x90000

        mov esi, offset message
        mov dx, COM1
print:
        mov al, byte ptr [esi]
        test al, al
        jz done
        out dx, al
        inc esi
        jmp print

done:
        mov al, EXIT_CODE
        mov dx, EXIT_PORT
        out dx, al
        hlt                             ; not reached when the exit port ends the run

        .align 8, 0
gdt:
        .dword 0, 0                     ; null descriptor
        .dword 0x0000FFFF, 0x00CF9A00   ; 0x08: code, base 0, limit 4 GiB, DPL 0, 32-bit
        .dword 0x0000FFFF, 0x00CF9200   ; 0x10: data, base 0, limit 4 GiB, DPL 0, writable
gdt_end:

gdt_descriptor:
        .word gdt_end - gdt - 1         ; limit
        .dword gdt                      ; linear base

message:
        .asciz "hello\n"
