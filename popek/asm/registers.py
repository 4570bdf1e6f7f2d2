"""x86 register names, as the assembler needs them: kind, width and the number that goes into ModRM.

A name in an operand is either one of these or a symbol; nothing else. Names are matched lower-cased.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reg:
    name: str
    kind: str   # gpr, sreg, cr, dr, xmm, mmx, st
    size: int   # bits (0 when it has no operand size, as for st(i))
    num: int    # ModRM encoding


def _table() -> dict[str, Reg]:
    regs: dict[str, Reg] = {}

    def add(kind: str, size: int, names: str) -> None:
        for num, name in enumerate(names.split()):
            regs[name] = Reg(name, kind, size, num)

    add("gpr", 32, "eax ecx edx ebx esp ebp esi edi")
    add("gpr", 16, "ax cx dx bx sp bp si di")
    add("gpr", 8, "al cl dl bl ah ch dh bh")
    add("sreg", 16, "es cs ss ds fs gs")
    add("cr", 32, "cr0 cr1 cr2 cr3 cr4 cr5 cr6 cr7")
    add("dr", 32, "dr0 dr1 dr2 dr3 dr4 dr5 dr6 dr7")
    add("xmm", 128, "xmm0 xmm1 xmm2 xmm3 xmm4 xmm5 xmm6 xmm7")
    add("mmx", 64, "mm0 mm1 mm2 mm3 mm4 mm5 mm6 mm7")
    regs["st"] = Reg("st", "st", 0, 0)
    return regs


REGISTERS = _table()

# 16-bit addressing ([bx+si] and friends) needs a 0x67 prefix in 32-bit code; the verifier allows that
# prefix only when the source asked for it this way.
ADDR16 = frozenset({"bx", "bp", "si", "di"})


def register(name: str) -> Reg | None:
    return REGISTERS.get(name.lower())
