# gp_storm.s: 10,000 cli at ring 3 (IOPL 0): each raises #GP(0); the handler counts it in ebx, skips the
# one-byte cli and returns. Checks the Unicorn repeated-#GP workaround: every one must be delivered.
.code32
.include "pm.inc"
.globl _start
_start:
  pm_setup
  set_gate 13, gp, INTGATE
  set_gate 0x80, done, USERGATE
  xor %ebx, %ebx
  enter_ring3 user

user:
  mov $10000, %ecx
1:
  cli
  loop 1b
  int $0x80

gp:
  cmpl $0, (%esp)               # error code 0
  jne bad
  incl %ebx
  addl $1, 4(%esp)              # skip the cli
  add $4, %esp                  # pop the error code
  iret
bad:
  exit 99
done:
  exit 0

pm_data
