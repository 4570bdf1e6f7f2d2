# negative: IN from the COM1 line-status port with EAX holding 'VMXh' by coincidence: wrong port.
.intel_syntax noprefix
.text
neg_serial:
    mov eax, 0x564d5868
    mov dx, 0x3fd
    in al, dx
    ret
