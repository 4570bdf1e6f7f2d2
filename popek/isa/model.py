"""The objects an ISA description turns into, and the Popek-Goldberg questions asked of them.

Vocabulary (Popek & Goldberg, CACM 1974):
- *privileged*: traps when executed in user mode and not in supervisor mode;
- *control-sensitive*: changes the mode or the resources (relocation, memory, I/O) of the machine;
- *behaviour-sensitive*: its effect depends on the mode (``behaviour-mode``) or on where it sits in real
  memory (``behaviour-location``);
- *innocuous*: neither.

A *model* says how one virtualization technique runs the guest kernel: at which real ring, which state the
hardware gives the guest its own copy of (``virtualizes``: an instruction that only touches such state is no
longer sensitive to the monitor), and which instructions trap to the monitor besides the privileged ones.
The derived questions (``sensitive_under``, ``traps_under``...) are pure functions of description and model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Report classes of the scan contract (DESIGN §3.2), plus innocuous for toy ISAs.
CATEGORIES = ("sensitive-unprivileged", "privileged", "io", "extended", "innocuous")
SENSITIVITY_KINDS = ("control", "behaviour-mode", "behaviour-location")
PRIVILEGE = ("yes", "no", "iopl", "conditional")  # iopl: traps when CPL > IOPL; conditional: when a control bit is set
DEPRIVILEGED = ("trap", "silent", "unaffected")
OPERAND_KINDS = ("sreg",)


@dataclass(frozen=True)
class Match:
    """How an instruction is recognised in Capstone's decoded output."""

    mnemonics: tuple[str, ...]
    opcode: bytes | None = None      # opcode bytes after prefixes (and REX)
    reg: int | None = None           # ModRM reg field (the /N of the SDM)
    operand: str | None = None       # an operand kind that must be present (OPERAND_KINDS)
    modes: frozenset[int] = frozenset({16, 32, 64})


@dataclass(frozen=True)
class Instruction:
    name: str
    category: str
    privileged: str
    summary: str = ""
    matches: tuple[Match, ...] = ()
    privileged_when: str = ""
    sensitive: tuple[str, ...] = ()          # SENSITIVITY_KINDS; empty means innocuous
    sensitive_why: str = ""
    user_sensitive: bool = False
    user_sensitive_why: str = ""
    deprivileged: str = "unaffected"
    deprivileged_why: str = ""
    robin_irvine: tuple[str, str] | None = None   # (group, the mnemonic as the paper lists it)
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    notes: tuple[tuple[int | None, str], ...] = ()  # (mode or None, text)
    line: int = 0

    @property
    def touches(self) -> frozenset[str]:
        return frozenset(self.reads) | frozenset(self.writes)

    @property
    def is_privileged(self) -> bool:
        """Traps at CPL > 0 on bare hardware (I/O under IOPL 0; conditional ones when the monitor sets the bit)."""
        return self.privileged != "no"


# What an ``exit`` line of a model may name besides instructions: the events that leave the guest by
# themselves (an exception, an interrupt, a triple fault, the interrupt window, a nested-paging fault).
_FAMILY = re.compile(r"(?<=[A-Z])n(?=_|$)")
EXIT_EVENTS = ("exception", "external-interrupt", "triple-fault", "interrupt-window", "ept-violation")


@dataclass(frozen=True)
class Exit:
    """One way out of the guest under a hardware-assisted model (``exit`` lines): the instruction or event
    ``name``, an optional qualifier ``when`` (``read``/``write`` for a register access, or the mnemonic when
    one canonical name covers several), the exit reason as the vendor numbers and names it (VT-x basic exit
    reason; AMD-V exit code), the controls that decide whether it exits (``always``: unconditionally), and
    where that is written. A reason name containing ``n`` as a word part (``CRn_READ``, ``EXCPn``) is a
    family: the register number or vector is added to ``reason`` and replaces the ``n``."""

    name: str
    reason: int
    reason_name: str
    controls: tuple[str, ...]
    why: str
    when: str | None = None

    @property
    def unconditional(self) -> bool:
        return self.controls == ("always",)

    def reason_for(self, n: int | None = None) -> tuple[int, str]:
        """(number, name) of this exit, for register number or vector ``n`` in a family."""
        if n is None or not self.is_family:
            return self.reason, self.reason_name
        return self.reason + n, _FAMILY.sub(str(n), self.reason_name, count=1)

    @property
    def is_family(self) -> bool:
        return _FAMILY.search(self.reason_name) is not None

    def describe(self) -> str:
        control = "always" if self.unconditional else ", ".join(self.controls)
        return f"exit {self.reason} {self.reason_name} ({control})"


@dataclass(frozen=True)
class Model:
    name: str
    description: str
    guest_ring: int = 3
    virtualizes: frozenset[str] = frozenset()
    virtualizes_why: str = ""
    traps: dict[str, str] = field(default_factory=dict)    # instruction name -> why it traps here
    sources: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    base: str | None = None
    line: int = 0
    exits: tuple[Exit, ...] = ()                            # hardware-assisted models: how each exit is reported

    def exits_for(self, name: str) -> tuple[Exit, ...]:
        """The ``exit`` lines for instruction or event ``name`` (several when qualified by ``when``)."""
        return tuple(e for e in self.exits if e.name == name)


@dataclass(frozen=True)
class Verdict:
    """What one instruction amounts to under one model."""

    instruction: Instruction
    sensitive: bool          # sensitive to the monitor (touches state the model does not virtualize)
    user_sensitive: bool
    traps: bool              # the monitor gets control when the deprivileged guest executes it
    why: str                 # one line

    @property
    def breaks_theorem1(self) -> bool:
        return self.sensitive and not self.traps

    @property
    def breaks_theorem3(self) -> bool:
        return self.user_sensitive and not self.traps


@dataclass(frozen=True)
class IsaDescription:
    name: str
    title: str
    path: str
    states: dict[str, str]
    groups: dict[str, str]
    instructions: dict[str, Instruction]
    models: dict[str, Model]

    def model(self, name: str) -> Model:
        from popek.errors import UsageError

        try:
            return self.models[name]
        except KeyError:
            raise UsageError(f"unknown model {name!r} in {self.path}; known: {', '.join(self.models)}") from None

    def verdict(self, insn: Instruction, model: Model) -> Verdict:
        exposed = insn.touches - model.virtualizes
        sensitive = bool(insn.sensitive) and bool(exposed)
        user_sensitive = insn.user_sensitive and bool(exposed)
        exits = model.exits_for(insn.name)
        exit_why = "; ".join((f"{e.when}: " if e.when else "") + e.describe() for e in exits)
        if insn.name in model.traps or any(e.unconditional for e in exits):
            why = model.traps.get(insn.name, "")
            traps, why = True, f"traps under {model.name}: " + "; ".join(w for w in (why, exit_why) if w)
        elif insn.is_privileged and model.guest_ring > 0:
            traps, why = True, f"traps: {insn.deprivileged_why or 'privileged'}"
        else:
            traps = False
            if sensitive:
                why = f"does not trap: {insn.deprivileged_why or insn.sensitive_why}"
            elif insn.sensitive:
                why = (f"not sensitive under {model.name}: "
                       f"{model.virtualizes_why or 'the state it touches is virtualized'}")
            else:
                why = "innocuous"
            if exit_why:
                why += f" (exits only when enabled: {exit_why})"
        return Verdict(insn, sensitive, user_sensitive, traps, why)

    def verdicts(self, model: Model) -> list[Verdict]:
        return [self.verdict(i, model) for i in self.instructions.values()]
