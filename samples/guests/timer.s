# timer.s: PIC remapped to 0x20/0x28, PIT channel 0 in mode 2 with divisor 1000, IRQ 0 counted by a handler
# that sends EOI; the main loop waits with sti; hlt until 10 ticks and exits with the tick count.
.code32
.include "pm.inc"
.globl _start
_start:
  pm_setup
  set_gate 0x20, irq0, INTGATE
  # 8259 pair: ICW1 (edge, cascade, ICW4), ICW2 offsets 0x20/0x28, ICW3 wiring, ICW4 8086 mode
  mov $0x11, %al
  out %al, $0x20
  out %al, $0xa0
  mov $0x20, %al
  out %al, $0x21
  mov $0x28, %al
  out %al, $0xa1
  mov $0x04, %al
  out %al, $0x21
  mov $0x02, %al
  out %al, $0xa1
  mov $0x01, %al
  out %al, $0x21
  out %al, $0xa1
  mov $0xfe, %al                # unmask IRQ 0 only
  out %al, $0x21
  mov $0xff, %al
  out %al, $0xa1
  # 8254 channel 0, lobyte/hibyte, mode 2, divisor 1000
  mov $0x34, %al
  out %al, $0x43
  mov $(1000 & 0xff), %al
  out %al, $0x40
  mov $(1000 >> 8), %al
  out %al, $0x40
  xor %ebx, %ebx                # ticks
  xor %esi, %esi                # busy-loop iterations between ticks
wait:
  sti
  inc %esi
  cmp $10, %ebx
  jb wait
  cli
  mov $'T', %al
  putc
  mov $'\n', %al
  putc
  mov %bl, %al
  out %al, $EXIT

irq0:
  inc %ebx
  push %eax
  mov $0x20, %al                # non-specific EOI
  out %al, $0x20
  pop %eax
  iret

pm_data
