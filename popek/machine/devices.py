"""The bare machine's devices, as data: each device lists its ports; ``PortBus`` is the port -> device table.

Devices are 8-bit ISA devices: a 16- or 32-bit access is split into byte accesses to consecutive ports, as
the ISA bus does. A port nobody claims reads as all ones and ignores writes.

Time. The machine has no wall clock: its time unit is one guest instruction. The PIT's input clock ticks
once per unit, so a divisor of 1193 raises IRQ 0 every 1193 guest instructions (at the real 1.193182 MHz
that would be a millisecond: the machine pretends to run 1.19 M instructions per second). While the CPU is
halted the machine skips time forward to the next timer event. Two runs of one guest therefore see the same
interrupts at the same instructions.
"""
from __future__ import annotations

from typing import Callable, Protocol

CONSOLE_LIMIT = 1 << 20      # bytes of console output kept; a guest printing forever cannot exhaust memory


class Device(Protocol):
    name: str
    ports: tuple[int, ...]

    def read(self, port: int) -> int: ...

    def write(self, port: int, value: int) -> bool:
        """Handle a byte write; True when the timer or interrupt schedule may have changed."""


class PortBus:
    """Port -> device table. ``read``/``write`` take the access width in bytes (1, 2 or 4)."""

    def __init__(self, devices: list[Device]):
        self.devices = devices
        self.table: dict[int, Device] = {}
        for device in devices:
            for port in device.ports:
                assert port not in self.table, f"port {port:#x} claimed twice"
                self.table[port] = device

    def read(self, port: int, size: int) -> int:
        value = 0
        for i in range(size):
            device = self.table.get((port + i) & 0xFFFF)
            byte = device.read((port + i) & 0xFFFF) if device else 0xFF
            value |= (byte & 0xFF) << (8 * i)
        return value

    def write(self, port: int, size: int, value: int) -> bool:
        replan = False
        for i in range(size):
            device = self.table.get((port + i) & 0xFFFF)
            if device:
                replan |= bool(device.write((port + i) & 0xFFFF, (value >> (8 * i)) & 0xFF))
        return replan

    def name(self, port: int) -> str:
        device = self.table.get(port)
        return device.name if device else "unclaimed"


class Serial:
    """COM1 (16550A at 0x3F8): transmit only. A byte written to THR is console output; LSR reads 0x60
    (transmitter empty, holding register empty); no receive data, no interrupts."""

    name = "com1"

    def __init__(self, base: int = 0x3F8):
        self.base = base
        self.ports = tuple(range(base, base + 8))
        self.regs = [0] * 8           # IER, IIR/FCR, LCR, MCR, LSR, MSR, scratch, as last written
        self.divisor = [0, 0]
        self.output = bytearray()
        self.dropped = 0

    def _dlab(self) -> bool:
        return bool(self.regs[3] & 0x80)

    def emit(self, data: bytes) -> None:
        """Console output that did not come through the port (a hypervisor's console, pv's console_io)."""
        room = max(0, CONSOLE_LIMIT - len(self.output))
        self.output += data[:room]
        self.dropped += max(0, len(data) - room)

    def read(self, port: int) -> int:
        reg = port - self.base
        if reg in (0, 1) and self._dlab():
            return self.divisor[reg]
        return {0: 0x00, 2: 0x01, 5: 0x60, 6: 0xB0}.get(reg, self.regs[reg])

    def write(self, port: int, value: int) -> bool:
        reg = port - self.base
        if reg in (0, 1) and self._dlab():
            self.divisor[reg] = value
        elif reg == 0:
            if len(self.output) < CONSOLE_LIMIT:
                self.output.append(value)
            else:
                self.dropped += 1
        elif reg not in (2, 5, 6):    # FCR, LSR, MSR writes change nothing a guest can observe here
            self.regs[reg] = value
        return False


class ExitPort:
    """Port 0xF4: a byte written ends the run with that exit code (QEMU's isa-debug-exit, without the shift)."""

    name = "exit"

    def __init__(self, on_exit: Callable[[int], None], port: int = 0xF4):
        self.ports = (port,)
        self.on_exit = on_exit

    def read(self, port: int) -> int:
        return 0xFF

    def write(self, port: int, value: int) -> bool:
        self.on_exit(value)
        return False


class _Chip:
    """One 8259A: IRR, ISR, IMR, the ICW1-4 sequence, OCW2 EOIs, OCW3 register select. Fixed priority
    (IR0 highest), edge triggered. Before its initialization sequence it delivers nothing."""

    def __init__(self):
        self.irr = self.isr = 0
        self.imr = 0xFF
        self.offset = 0
        self.initialized = False
        self.auto_eoi = False
        self._expect = 0          # next ICW expected on the data port (2, 3, 4), 0 when none
        self._icw4 = self._single = False
        self._read_isr = False

    def command(self, value: int) -> None:
        if value & 0x10:                              # ICW1: restart initialization
            self.irr = self.isr = self.imr = 0
            self.initialized = False
            self._icw4, self._single = bool(value & 1), bool(value & 2)
            self._expect, self._read_isr = 2, False
        elif value & 0x08:                            # OCW3: RR/RIS select the register read at the command port
            if value & 0x02:
                self._read_isr = bool(value & 1)
        elif value & 0x20:                            # OCW2 with EOI: specific (SL) or highest in service
            if value & 0x40:
                self.isr &= ~(1 << (value & 7))
            elif self.isr:
                self.isr &= self.isr - 1              # clears the lowest set bit: the highest priority

    def data(self, value: int) -> None:
        if self._expect == 2:
            self.offset = value & 0xF8
            self._expect = 3 if not self._single else 4 if self._icw4 else 0
        elif self._expect == 3:
            self._expect = 4 if self._icw4 else 0     # cascade wiring is fixed here (slave on IR2)
        elif self._expect == 4:
            self.auto_eoi = bool(value & 2)
            self._expect = 0
        else:
            self.imr = value
            return
        self.initialized = self._expect == 0

    def read_command(self) -> int:
        return self.isr if self._read_isr else self.irr

    def highest(self, irr: int) -> int | None:
        """The request that would be acknowledged now, or None (masked, or blocked by one in service)."""
        if not self.initialized:
            return None
        wanting = irr & ~self.imr
        for line in range(8):
            if self.isr & (1 << line):
                return None
            if wanting & (1 << line):
                return line
        return None

    def take(self, line: int) -> int:
        self.irr &= ~(1 << line)
        if not self.auto_eoi:
            self.isr |= 1 << line
        return self.offset + line


class PIC:
    """The 8259A pair: master at 0x20/0x21, slave at 0xA0/0xA1 cascaded on master IR2."""

    name = "pic"
    ports = (0x20, 0x21, 0xA0, 0xA1)

    def __init__(self):
        self.master, self.slave = _Chip(), _Chip()

    def _chip(self, port: int) -> _Chip:
        return self.master if port < 0xA0 else self.slave

    def read(self, port: int) -> int:
        chip = self._chip(port)
        return chip.imr if port & 1 else chip.read_command()

    def write(self, port: int, value: int) -> bool:
        chip = self._chip(port)
        (chip.data if port & 1 else chip.command)(value)
        return True                                   # masks and EOIs change what can be delivered

    def raise_irq(self, irq: int) -> None:
        if irq < 8:
            self.master.irr |= 1 << irq
        else:
            self.slave.irr |= 1 << (irq - 8)

    def _master_irr(self) -> int:
        cascade = 4 if self.slave.highest(self.slave.irr) is not None else 0
        return self.master.irr | cascade

    def pending(self) -> bool:
        """An interrupt the CPU would take now if its IF allowed it."""
        return self.master.highest(self._master_irr()) is not None

    def could_take(self, irq: int) -> bool:
        """Whether raising ``irq`` (a master line) would make an interrupt pending."""
        return self.master.highest(self._master_irr() | (1 << irq)) is not None

    def acknowledge(self) -> int:
        """INTA: the vector of the highest pending request, moved from IRR to ISR. Precondition: pending()."""
        line = self.master.highest(self._master_irr())
        assert line is not None
        if line == 2 and not self.master.irr & 4:      # the request came from the slave
            if not self.master.auto_eoi:
                self.master.isr |= 4
            return self.slave.take(self.slave.highest(self.slave.irr))
        return self.master.take(line)


PERIODIC, ONE_SHOT = (2, 3), (0, 4)


class _Channel:
    def __init__(self):
        self.mode = 0
        self.access = 3           # 1 LSB, 2 MSB, 3 LSB then MSB
        self.reload = 0           # count as loaded (0 stands for 65536)
        self.start = 0            # machine time of the load
        self.next_fire: int | None = None
        self.latch: int | None = None
        self._low_pending: int | None = None
        self._read_high = False

    @property
    def period(self) -> int:
        return self.reload or 0x10000

    def count(self, now: int) -> int:
        elapsed = now - self.start
        if self.mode in PERIODIC:
            return self.period - elapsed % self.period
        return (self.period - elapsed) & 0xFFFF


class PIT:
    """8254 channels 0-2 at 0x40-0x42, mode/command at 0x43. Channel 0 drives IRQ 0: modes 2 and 3 fire every
    ``divisor`` clocks, modes 0 and 4 once; modes 1 and 5 need a gate edge, which channel 0 never sees.
    Mode 3 counts like mode 2 here (the square wave's halves are not modelled), BCD counting is ignored,
    and the read-back command (0xC0-0xFF) is not modelled."""

    name = "pit"
    ports = (0x40, 0x41, 0x42, 0x43)

    def __init__(self, clock: Callable[[], int]):
        self.clock = clock
        self.channels = [_Channel(), _Channel(), _Channel()]

    def read(self, port: int) -> int:
        if port == 0x43:
            return 0xFF
        ch = self.channels[port - 0x40]
        value = ch.latch if ch.latch is not None else ch.count(self.clock())
        if ch.access == 1:
            return value & 0xFF
        if ch.access == 2:
            return (value >> 8) & 0xFF
        ch._read_high = not ch._read_high
        if not ch._read_high:
            ch.latch = None                           # a latched value is released after both bytes
            return (value >> 8) & 0xFF
        return value & 0xFF

    def write(self, port: int, value: int) -> bool:
        if port == 0x43:
            select = value >> 6
            if select == 3:
                return False
            ch = self.channels[select]
            access = (value >> 4) & 3
            if access == 0:                           # counter latch command
                ch.latch = ch.count(self.clock())
                return False
            mode = (value >> 1) & 7
            ch.mode, ch.access = (mode - 4 if mode >= 6 else mode), access
            ch.next_fire, ch.latch, ch._low_pending, ch._read_high = None, None, None, False
            return True
        ch = self.channels[port - 0x40]
        if ch.access == 3 and ch._low_pending is None:
            ch._low_pending = value
            return False
        if ch.access == 3:
            ch.reload = ch._low_pending | (value << 8)
            ch._low_pending = None
        else:
            ch.reload = value if ch.access == 1 else value << 8
        ch.start = self.clock()
        fires = ch.mode in PERIODIC or ch.mode in ONE_SHOT
        ch.next_fire = ch.start + ch.period if fires else None
        return True

    def next_event(self) -> int | None:
        """Machine time of channel 0's next output edge (IRQ 0), or None."""
        return self.channels[0].next_fire

    def advance(self, now: int) -> int:
        """Fire every channel-0 edge due by ``now``; returns how many (the PIC coalesces them)."""
        ch = self.channels[0]
        if ch.next_fire is None or ch.next_fire > now:
            return 0
        if ch.mode in ONE_SHOT:
            ch.next_fire = None
            return 1
        fired = (now - ch.next_fire) // ch.period + 1
        ch.next_fire += fired * ch.period
        return fired
