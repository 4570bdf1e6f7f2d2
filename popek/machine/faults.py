"""Vectors, and the two records an exception travels in: ``GuestFault`` (raised) and ``Interrupt`` (delivered).

A ``GuestFault`` is a Python exception that machine code raises where the SDM says "#GP(0)" or "#PF": while
reading guest memory, checking a gate or pushing a frame. It never escapes the machine; it becomes an
``Interrupt`` for the guest's IDT (or, while delivering another one, a #DF or a triple fault).
"""
from __future__ import annotations

from dataclasses import dataclass

DE, DB, NMI, BP, OF, BR, UD, NM, DF = 0, 1, 2, 3, 4, 5, 6, 7, 8
TS, NP, SS, GP, PF, MF, AC, MC, XM = 10, 11, 12, 13, 14, 16, 17, 18, 19

# One name per vector, as the SDM writes them; events and messages use these.
NAMES = {DE: "#DE", DB: "#DB", NMI: "NMI", BP: "#BP", OF: "#OF", BR: "#BR", UD: "#UD", NM: "#NM", DF: "#DF",
         9: "#CSO", TS: "#TS", NP: "#NP", SS: "#SS", GP: "#GP", PF: "#PF", MF: "#MF", AC: "#AC", MC: "#MC",
         XM: "#XM", 20: "#VE", 21: "#CP"}

# Exceptions that push an error code (SDM Vol. 3A Table 6-1). #CP (21) is left out: no CET here.
ERROR_CODE = frozenset({DF, TS, NP, SS, GP, PF, AC})
# SDM Vol. 3A Table 6-4/6-5: which pairs of faults make a double fault.
CONTRIBUTORY = frozenset({DE, TS, NP, SS, GP})


def name(vector: int) -> str:
    return NAMES.get(vector, f"vector {vector:#x}")


def double_fault(first: int, second: int) -> bool:
    """True when ``second``, raised while delivering ``first``, becomes #DF (else: handled serially)."""
    if first in CONTRIBUTORY:
        return second in CONTRIBUTORY
    if first == PF:
        return second in CONTRIBUTORY or second == PF
    return False


class GuestFault(Exception):
    """An exception the guest must see, raised by machine code (not by Unicorn)."""

    def __init__(self, vector: int, error_code: int | None = 0, why: str = "", address: int | None = None):
        super().__init__(f"{name(vector)}({error_code:#x}) {why}" if error_code is not None else why)
        self.vector, self.error_code, self.why, self.address = vector, error_code, why, address

    def event(self, insn: int) -> Interrupt:
        """This fault as the exception the guest takes at the instruction ``insn`` (a fault's frame points at
        the instruction that faulted); a page fault carries its address for CR2."""
        return Interrupt(self.vector, EXCEPTION, self.error_code if self.vector in ERROR_CODE else None,
                         eip=insn, insn=insn, why=self.why, address=self.address if self.vector == PF else None)


class NotModelled(Exception):
    """The guest did something the monitor does not model (iret to virtual-8086 mode, ...). The run ends
    there with reason ``unsupported`` rather than go on unlike the hardware: a fault the CPU would not
    raise would be a silent divergence."""


# Where an event comes from; the SDM treats them differently (gate DPL check, EXT bit, pushed EIP).
EXCEPTION, SOFTWARE, EXTERNAL = "exception", "software", "external"


@dataclass(slots=True)          # not frozen: a frozen dataclass costs ~1 µs more to build, once per event
class Interrupt:
    """An exception, a software interrupt (int n, int3, into) or an external interrupt, on its way to the IDT.

    ``eip`` is what the frame will hold: the faulting instruction for a fault, the next instruction for
    ``int n`` and for an external interrupt. ``insn`` is the address of the instruction that caused it,
    which is where a fault raised while delivering it points. ``address``: for a page fault found by
    machine or monitor code (not by Unicorn, which sets the real CR2 itself), the linear address that
    delivery writes into the CR2 the guest sees. ``fetch``: a #PF Unicorn raised fetching the instruction's
    own bytes (which it does not count as run, unlike a faulting data access).
    """

    vector: int
    source: str = EXCEPTION
    error_code: int | None = None
    eip: int = 0
    insn: int = 0
    why: str = ""
    address: int | None = None
    fetch: bool = False

    @property
    def name(self) -> str:
        if self.source == SOFTWARE:
            return "int3" if self.vector == BP else "into" if self.vector == OF else f"int {self.vector:#x}"
        if self.source == EXTERNAL:
            return f"vector {self.vector:#x}"
        return name(self.vector)
