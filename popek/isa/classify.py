"""The classification query: which described instruction is this decoded instruction?

Built once from a description into a table keyed on Capstone's instruction id, so the scanner's
per-instruction work is one dict lookup for the ~99% of instructions that cannot matter. Only candidates look
at bytes (opcode, ModRM /N) or operands. The scanner and the translator both classify through here.

Never keyed on the printed mnemonic: Capstone prints prefixes into it (``repne outsb``, ``bnd retf``,
``notrack jmp``), and one byte of prefix must not hide an instruction. The id names what the instruction is;
the description's opcode and ModRM /N lines tell apart encodings that share an id (FF /2 and FF /3).
"""
from __future__ import annotations

import re

from popek.decode import Insn, ids_for, opcode_and_modrm
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
        self._by_id: dict[int, list[tuple[Match, Instruction]]] = {}
        for insn in isa.instructions.values():
            if insn.category == "extended" and not extended:
                continue
            for match in insn.matches:
                for mnemonic in match.mnemonics:
                    self._rules.setdefault(mnemonic, []).append((match, insn))
                    for ident in ids_for(mnemonic):
                        rules = self._by_id.setdefault(ident, [])
                        if (match, insn) not in rules:      # "outsb" and "rep outsb" are one id
                            rules.append((match, insn))
        # The bare mnemonics (without prefixes) that can name a described instruction.
        self.mnemonics = frozenset(m.split()[-1] for m in self._rules)
        self.candidate_ids = self._candidate_ids()
        self.verdicts = {name: isa.verdict(insn, self.model) for name, insn in isa.instructions.items()}

    def _candidate_ids(self) -> dict[int, frozenset[int] | None]:
        """Capstone ids that can be a described instruction, each with the first opcode bytes its rules
        accept (None: any), so the scanner rejects e.g. an ordinary MOV from its first byte alone."""
        firsts: dict[int, set[int] | None] = {}
        for ident, rules in self._by_id.items():
            firsts[ident] = None if any(m.opcode is None for m, _ in rules) else {m.opcode[0] for m, _ in rules}
        return {k: (frozenset(v) if v is not None else None) for k, v in firsts.items()}

    def unknown_mnemonics(self) -> list[str]:
        """Mnemonics in the description that Capstone never prints (a typo would silently match nothing)."""
        return sorted(m for m in self._rules if not ids_for(m))

    def lookup(self, code, offset: int, mode: int, mnemonic: str, op_str: str) -> Instruction | None:
        """The entry for the instruction at ``code[offset]`` that Capstone decoded as (mnemonic, op_str);
        the mnemonic's prefix words (``rep``, ``bnd``, ``notrack``, ``lock``...) do not matter."""
        words = mnemonic.split()
        if not words:
            return None
        for ident in ids_for(words[-1]):
            entry = self.lookup_id(code, offset, mode, ident, op_str)
            if entry is not None:
                return entry
        return None

    def lookup_id(self, code, offset: int, mode: int, ident: int, op_str: str) -> Instruction | None:
        """The entry for the instruction at ``code[offset]`` that Capstone decoded with instruction id
        ``ident`` (the scanner has the id from Capstone's record)."""
        rules = self._by_id.get(ident)
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
