# syscall.s: ring 3 entered with iretd; system calls with int $0x80 through a DPL-3 trap gate.
# eax = 1: write the byte in bl to the console; eax = 2: exit with the code in bl.
# The handler checks that it runs on the kernel stack from the TSS with the ring-3 frame above it.
.code32
.include "pm.inc"
.globl _start
_start:
  pm_setup
  set_gate 0x80, syscall, USERGATE
  enter_ring3 user

user:
  mov $UDATA, %ax
  mov %ax, %ds
  mov %ax, %es
  mov $text, %esi
1:
  movb (%esi), %bl
  test %bl, %bl
  jz 2f
  mov $1, %eax
  int $0x80
  inc %esi
  jmp 1b
2:
  mov $2, %eax
  mov $0, %bl
  int $0x80
  hlt                           # not reached

syscall:
  # frame on the kernel stack: eip, cs, eflags, esp, ss (no error code for int n)
  cmpl $UCODE, 4(%esp)
  jne bad
  cmpl $UDATA, 16(%esp)
  jne bad
  cmp $(KSTACK - 20), %esp
  jne bad
  cmp $1, %eax
  je sys_write
  cmp $2, %eax
  je sys_exit
bad:
  exit 99
sys_write:
  push %edx
  mov %bl, %al
  putc
  pop %edx
  iret
sys_exit:
  mov %bl, %al
  out %al, $EXIT

text:
  .asciz "ring 3 says hi\n"

pm_data
