"""Near branches with a 16-bit operand or address size, carried out as the CPU does (SDM Vol. 2, JMP, CALL,
Jcc, RET, LOOP, JCXZ): with a 66 prefix EIP is truncated to 16 bits and a call or return pushes or pops a
16-bit IP; with a 67 prefix loop and jecxz count in CX. The binary translator hands them to this routine
rather than translating them (they are rare, and each needs its own exits)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from popek.decode import COUNTER_KINDS, detail_at, near_transfer
from popek.machine.faults import UD, GuestFault
from popek.monitors.emulation.access import get_reg, peek, push, read, set_reg
from popek.monitors.emulation.recipe import Recipe, _operand

if TYPE_CHECKING:
    from popek.machine.machine import Machine
    from popek.monitors.vcpu import VCpu

CF, PF, ZF, SF, OF = 1 << 0, 1 << 2, 1 << 6, 1 << 7, 1 << 11


def condition(cc: int, eflags: int) -> bool:
    """Whether condition ``cc`` (the low nibble of a Jcc opcode) holds; odd codes negate even ones."""
    sf_ne_of = bool(eflags & SF) != bool(eflags & OF)
    base = (eflags & OF, eflags & CF, eflags & ZF, eflags & (CF | ZF), eflags & SF, eflags & PF, sf_ne_of,
            bool(eflags & ZF) or sf_ne_of)[cc >> 1]
    return bool(base) != bool(cc & 1)


def execute(m: Machine, v: VCpu, raw: bytes, eip: int) -> int:
    """Carry out the near transfer ``raw`` at guest ``eip``; return the EIP it leaves. Faults (a stack or
    memory operand that cannot be reached) raise GuestFault with nothing changed."""
    flow = near_transfer(raw)
    if flow is None:
        raise GuestFault(UD, None, f"not a near branch: {raw.hex()}")
    next_ip = (eip + len(raw)) & 0xFFFFFFFF
    width, kind = flow.opsize // 8, flow.kind
    space = v.space(m)
    if kind == "jmp":
        return flow.target(next_ip)
    if kind == "jcc":
        return flow.target(next_ip) if condition(flow.cond, m.reg("eflags")) else next_ip
    if kind == "call":
        push(m, v, space, [next_ip], width)
        return flow.target(next_ip)
    if kind == "ret":
        (ip,) = peek(m, v, space, 1, width)
        m.set_reg("esp", (m.reg("esp") + width + flow.release) & 0xFFFFFFFF)
        return ip
    if kind in COUNTER_KINDS:
        counter = "cx" if flow.addrsize == 16 else "ecx"
        value = get_reg(m, counter)
        if kind == "jecxz":
            taken = value == 0
        else:
            value = (value - 1) & (0xFFFF if counter == "cx" else 0xFFFFFFFF)
            set_reg(m, counter, value)
            zf = bool(m.reg("eflags") & ZF)
            taken = value != 0 and {"loop": True, "loope": zf, "loopne": not zf}[kind]
        return flow.target(next_ip) if taken else next_ip
    insn = detail_at(raw, 0, eip, 32)                   # jmp r/m16, call r/m16
    operand = _operand(insn, insn.operands[0])
    recipe = Recipe(kind, eip, len(raw), raw, f"{insn.mnemonic} {insn.op_str}", (operand,), width,
                    flow.addrsize // 8, False, next_ip)
    target = read(m, v, recipe, operand, space, width)
    if kind == "call_rm":
        push(m, v, space, [next_ip], width)
    return target
