"""Emulation routines: the Popek-Goldberg "interpreter" that every deprivileging monitor shares.

One routine per instruction, in ``TABLE`` keyed by canonical name (DESIGN §3.1). A routine is
``routine(machine, vcpu, recipe) -> int``: it carries out the instruction described by ``recipe`` as the
bare machine would at the *virtual* privilege level of ``vcpu``, reading and writing the guest's registers
through the machine's raw accessors and its memory through the guest's own paging and segments, and returns
the EIP to continue at (``recipe.next`` unless it transfers control). An exception the instruction raises
at the virtual CPL is raised as ``GuestFault`` before any state changed; the caller delivers it through the
guest's virtual IDT (``popek.monitors.vcpu.deliver``). ``emulate`` is the dispatch.

Read in this order: ``recipe`` (what an instruction is decoded into, once per address, and the cache that
checks it against guest memory on every use: nothing is decoded on the hot path), ``access`` (registers,
operands, the stack, privilege checks), then the routines: ``system`` (privileged and I/O), ``sensitive``
(the sensitive-unprivileged stores, flags, segment registers, lar/lsl/verr/verw) and ``transfer`` (far
jmp/call/ret, int n, iret).

Two groups, two users:
- privileged and I/O (``lgdt`` ... ``invd``, ``rdtsc``, ``rdtscp``, ``xsetbv``; ``sysenter`` and
  ``sysexit``, which fault because the SYSENTER MSRs are kept virtual): they fault at the deprivileged ring, so ``trap``
  runs them here when their #GP arrives;
- sensitive-unprivileged (``sgdt`` ... ``iret``): they do not fault, so ``trap`` never calls them (the
  guest sees the real machine: the divergence ``trap`` exists to show) except when one does fault at the
  real ring (an SS load with RPL 0, an ``iret`` or ``retf`` to an RPL-0 frame, anything under CR4.UMIP);
  ``bt`` calls them from its callouts. Each produces what the bare machine would at the virtual CPL
  (tests/test_trap.py checks every routine against the bare machine).

Not modelled (the routine raises a fault that says so): task switches (far jumps, calls and ``iret`` with
NT into a TSS or task gate), virtual-8086 mode, 16-bit stack segments, segment limits (Unicorn does not
check them either). ``rdpmc`` and ``cpuid`` never trap on this machine (Unicorn: ``rdpmc`` is #UD at every
CPL; no CPUID faulting), so they have no routine; ``rdtsc`` and ``rdtscp`` have one for guests that set CR4.TSD (and for ``bt``,
which calls it for every one: the machine's TSC is its clock).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from popek.monitors.emulation.access import (address, cpl0, flags, get_reg, io_allowed, iopl_check, peek, push, read,
                                             set_reg, umip, write, zf)
from popek.monitors.emulation.recipe import (CR, DR, IMM, MEM, REG, SREG, Operand, Recipe, Recipes, classifier,
                                             decode)
from popek.monitors.emulation.sensitive import (check_segment, lar, load_segment, lsl, mov_from_seg, mov_to_seg,
                                                pop_seg, popf, push_seg, pushf, sgdt, sidt, sldt, smsw, str_, verr,
                                                verw)
from popek.monitors.emulation.system import (cache, cli, clts, hlt, in_, ins, invlpg, lgdt, lidt, lldt, lmsw, ltr,
                                             mov_cr, mov_dr, out, outs, rdmsr, rdtsc, rdtscp, sti,
                                             wrmsr, xsetbv)
from popek.monitors.emulation.transfer import call_far, int_, iret, jmp_far, ret_far, sysenter, sysexit
from popek.monitors.vcpu import VCpu

if TYPE_CHECKING:
    from popek.machine.machine import Machine

Routine = Callable[["Machine", VCpu, Recipe], int]

# The table: canonical name -> routine. Privileged and I/O first, then the sensitive-unprivileged ones.
TABLE: dict[str, Routine] = {
    "lgdt": lgdt, "lidt": lidt, "lldt": lldt, "ltr": ltr, "lmsw": lmsw, "clts": clts, "mov_cr": mov_cr,
    "mov_dr": mov_dr, "invlpg": invlpg, "hlt": hlt, "cli": cli, "sti": sti, "in": in_, "out": out,
    "ins": ins, "outs": outs, "rdmsr": rdmsr, "wrmsr": wrmsr, "wbinvd": cache, "invd": cache,
    "rdtsc": rdtsc, "rdtscp": rdtscp, "xsetbv": xsetbv, "sysenter": sysenter, "sysexit": sysexit,
    "sgdt": sgdt, "sidt": sidt, "sldt": sldt, "smsw": smsw, "str": str_, "pushf": pushf, "popf": popf,
    "push_seg": push_seg, "pop_seg": pop_seg, "mov_from_seg": mov_from_seg, "mov_to_seg": mov_to_seg,
    "lar": lar, "lsl": lsl, "verr": verr, "verw": verw, "call_far": call_far, "jmp_far": jmp_far,
    "ret_far": ret_far, "int": int_, "int3": int_, "into": int_, "iret": iret,
}
PRIVILEGED = frozenset({"lgdt", "lidt", "lldt", "ltr", "lmsw", "clts", "mov_cr", "mov_dr", "invlpg", "hlt",
                        "cli", "sti", "in", "out", "ins", "outs", "rdmsr", "wrmsr", "wbinvd", "invd", "rdtsc",
                        "rdtscp", "xsetbv", "sysenter", "sysexit"})
SENSITIVE = frozenset(TABLE) - PRIVILEGED


STRING_ROUTINES = frozenset({"ins", "outs"})     # the routines that run a rep prefix's elements


def rep_remaining(m: Machine, r: Recipe) -> int:
    """The count register of a rep-prefixed string instruction ``r`` (address-size wide); 0 for any other
    (a rep prefix elsewhere counts nothing, and ECX may be a result: rdtscp)."""
    if not r.rep or r.name not in STRING_ROUTINES:
        return 0
    return m.reg("ecx") & (0xFFFFFFFF if r.addrsize == 4 else 0xFFFF)


def count_elements(m: Machine, r: Recipe, before: int) -> None:
    """After ``r`` was carried out whole by a monitor (``before``: ``rep_remaining`` then), or faulted part
    way: a rep string instruction counts once per element on the bare machine, plus its final check (the
    attempt the monitor's entry already counted), so the guest's instruction count and clock advance by the
    elements done, as natively (timer interrupts then land where they land natively)."""
    done = before - rep_remaining(m, r)
    m.instructions += done
    m.time += done


def emulate(m: Machine, v: VCpu, r: Recipe) -> int:
    """Run ``r`` against ``v``; the EIP to continue at. Precondition: ``r.name in TABLE``."""
    return TABLE[r.name](m, v, r)


_umip = umip        # its name in the single-module version, which bt_routines still uses

# The routines by name, and what a callout or a routine of its own needs: recipes and operands, register and
# memory access, the stack, the privilege checks, the segment-load checks.
__all__ = ["TABLE", "PRIVILEGED", "SENSITIVE", "Routine", "emulate",
           "decode", "classifier", "Recipe", "Recipes", "Operand", "REG", "SREG", "CR", "DR", "MEM", "IMM",
           "get_reg", "set_reg", "address", "read", "write", "push", "peek", "flags", "zf",
           "cpl0", "iopl_check", "umip", "io_allowed", "check_segment", "load_segment"]
