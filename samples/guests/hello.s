# hello.s: console output on COM1 (waiting for "transmitter empty" in LSR, port 0x3fd), then exit code 0.
.code32
.globl _start
_start:
  mov $message, %esi
next:
  lodsb
  test %al, %al
  jz done
  mov %al, %bl
  mov $0x3fd, %dx
wait:
  in %dx, %al
  test $0x20, %al
  jz wait
  mov %bl, %al
  mov $0x3f8, %dx
  out %al, %dx
  jmp next
done:
  mov $0, %al
  out %al, $0xf4
message:
  .asciz "hello, world\n"
