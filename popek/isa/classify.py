"""The classification query: which described instruction is this decoded instruction?

Built once from a description into a table keyed on Capstone's mnemonic, so the scanner's per-instruction
work is one dict lookup for the ~99% of instructions that cannot matter. Only candidates look at bytes
(opcode, ModRM /N) or operands. The scanner and the translator both classify through here.
"""
from __future__ import annotations

import re

from popek.decode import Insn, opcode_and_modrm
from popek.isa.model import IsaDescription, Instruction, Match, Model

# A segment register as an operand, not as a segment-override prefix ("fs:[0]").
_SREG_OPERAND = re.compile(r"\b(?:cs|ds|es|fs|gs|ss)\b(?!:)")


class Classifier:
    """Map decoded instructions to ISA entries, and entries to their verdict under one model."""

    def __init__(self, isa: IsaDescription, model: Model | str = "ia32", *, extended: bool = False):
        self.isa = isa
        self.model = isa.model(model) if isinstance(model, str) else model
        self.extended = extended
        self._rules: dict[str, list[tuple[Match, Instruction]]] = {}
        for insn in isa.instructions.values():
            if insn.category == "extended" and not extended:
                continue
            for match in insn.matches:
                for mnemonic in match.mnemonics:
                    self._rules.setdefault(mnemonic, []).append((match, insn))
        self.mnemonics = frozenset(self._rules)
        self.verdicts = {name: isa.verdict(insn, self.model) for name, insn in isa.instructions.items()}

    def lookup(self, code, offset: int, mode: int, mnemonic: str, op_str: str) -> Instruction | None:
        """The entry for the instruction at ``code[offset]`` that Capstone decoded as (mnemonic, op_str)."""
        rules = self._rules.get(mnemonic)
        if rules is None:
            return None
        opcode = None
        for match, insn in rules:
            if mode not in match.modes:
                continue
            if match.opcode is not None:
                if opcode is None:
                    opcode = opcode_and_modrm(code, offset, mode)
                op, modrm = opcode
                if op != match.opcode:
                    continue
                if match.reg is not None and (modrm is None or (modrm >> 3) & 7 != match.reg):
                    continue
            if match.operand == "sreg" and not _SREG_OPERAND.search(op_str):
                continue
            return insn
        return None

    def classify(self, insn: Insn) -> Instruction | None:
        return self.lookup(insn.raw, 0, insn.mode, insn.mnemonic, insn.op_str)
