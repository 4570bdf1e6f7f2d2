"""Popek & Goldberg's theorems, checked on a description under a model.

Theorem 1: a VMM can be built if every sensitive instruction is privileged (here: traps to the monitor
under the model). Theorem 3: a hybrid VMM (one that interprets virtual supervisor mode and runs only
virtual user mode directly) can be built if every user-sensitive instruction is privileged.
"""
from __future__ import annotations

from dataclasses import dataclass

from popek.isa.model import IsaDescription, Model, Verdict
from popek.tabular import Tabular


@dataclass(frozen=True)
class TheoremResult(Tabular):
    isa: IsaDescription
    model: Model
    verdicts: tuple[Verdict, ...]

    @property
    def theorem1_violations(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.breaks_theorem1]

    @property
    def theorem3_violations(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.breaks_theorem3]

    @property
    def robin_irvine(self) -> list[tuple[str, str]]:
        """(group, mnemonic as listed by Robin & Irvine) for the Theorem 1 violations that are on their list,
        in the order of the description, each mnemonic once."""
        seen, out = set(), []
        for v in self.theorem1_violations:
            ri = v.instruction.robin_irvine
            if ri and ri[1] not in seen:
                seen.add(ri[1])
                out.append(ri)
        return out

    @property
    def conclusion(self) -> str:
        if not self.theorem1_violations:
            return ("virtualizable: every sensitive instruction traps, so a trap-and-emulate VMM can be built "
                    "(Theorem 1)")
        if not self.theorem3_violations:
            return ("not virtualizable by trap-and-emulate, but a hybrid VMM that interprets virtual supervisor "
                    "mode can be built (Theorem 3)")
        return ("not virtualizable: neither a VMM (Theorem 1) nor a hybrid VMM (Theorem 3) can be built by "
                "trap-and-emulate alone; binary translation, paravirtualization or hardware support is needed")

    def caption(self) -> str:
        return f"{self.isa.name} under {self.model.name}: {self.conclusion}"

    def table(self) -> tuple[list[str], list[list]]:
        """One row per instruction of the description: its verdict under the model."""
        return (["instruction", "sensitive", "traps", "breaks theorem 1", "breaks theorem 3", "why"],
                [[v.instruction.name, v.sensitive, v.traps, v.breaks_theorem1, v.breaks_theorem3, v.why]
                 for v in self.verdicts])

    def to_dict(self) -> dict:
        def part(violations: list[Verdict]) -> dict:
            return {"holds": not violations, "violations": [v.instruction.name for v in violations],
                    "why": {v.instruction.name: v.why for v in violations}}

        return {
            "isa": self.isa.name, "model": self.model.name, "description": self.model.description,
            "guest_ring": self.model.guest_ring,
            "theorem1": part(self.theorem1_violations),
            "theorem3": part(self.theorem3_violations),
            "robin_irvine": [{"group": g, "mnemonic": m} for g, m in self.robin_irvine],
            "conclusion": self.conclusion,
            "notes": list(self.model.notes),
        }


def check(isa: IsaDescription, model: Model | str) -> TheoremResult:
    model = isa.model(model) if isinstance(model, str) else model
    return TheoremResult(isa, model, tuple(isa.verdicts(model)))
