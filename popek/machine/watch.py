"""Knowing which instructions the guest runs, without a Python hook on every instruction.

Two pieces, shared by everything that must see particular guest instructions as they execute:

- ``BlockDecoder``: the canonical name (DESIGN §3.1, from the ISA description's classifier) of every
  instruction in the blocks Unicorn translates, classified once per address *and contents*. Unicorn's
  ``UC_HOOK_BLOCK`` fires before every block it executes (about 12 M blocks/s, REFERENCES); ``block``
  reads that block's bytes (one raw read, physically while CR0.PG is clear, through the guest's page
  tables while it is set; CR0 is read at every block, so no instruction that changes it can be missed)
  and classifies again only what changed. Self-modifying code therefore never leaves a stale
  name: a store into code makes Unicorn retranslate the block, whose new bytes are read before its first
  instruction runs. The ``emulate`` monitor uses it for every instruction it interprets.
- ``Watch``: call ``on_insn(address, name)`` before each execution of an instruction whose canonical name is
  in a given set, and nothing for the others. For each such instruction the decoder finds, the watch puts a
  code hook on exactly that address; the block that revealed it was translated without the hook, so it is
  dropped from Unicorn's cache and the chunk restarts at the block's start (none of its instructions has
  run yet). A code hook fires before its instruction executes; ``on_insn`` may stop the chunk there with a
  pending event (``Machine.stop_chunk``), and the instruction is then not executed. CR4.UMIP
  (``popek.machine.umip``) and the exits of a hardware-assisted monitor are watches.

Exactness: every execution of a watched instruction reaches ``on_insn`` (a loop of N ``cpuid`` calls it N
times), and no other instruction does.
"""
from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Callable, Iterable

import unicorn
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import UC_X86_REG_CR0 as UC_CR0

from popek.decode import BAD, sweep
from popek.machine.faults import GuestFault
from popek.machine.memory import CR0_PG

if TYPE_CHECKING:
    from popek.isa.classify import Classifier
    from popek.machine.machine import Machine

ALL = (0, 0xFFFFFFFF)               # hook range: every linear address
BLOCK_MAX = 4096                    # a translated block is far smaller (QEMU caps it at 512 instructions)


class BlockDecoder:
    """Canonical names of the instructions of executed blocks (module docstring)."""

    def __init__(self, machine: Machine, classifier: Classifier):
        self.m, self.classifier = machine, classifier
        self.names: dict[int, str | None] = {}     # instruction address -> canonical name or None
        self.raw: dict[int, bytes] = {}            # instruction address -> the bytes it was classified from
        self.blocks: dict[tuple[int, int], bytes] = {}
        self.decoded = 0                           # instructions classified
        self.code_changed = 0                      # addresses classified again because their bytes changed
        self._uch, self._buf = machine.uc._uch, ctypes.create_string_buffer(BLOCK_MAX)

    def fetch(self, address: int, size: int) -> bytes | None:
        """The block's bytes as the CPU fetches them, or None when the fetch faults (for the guest too)."""
        if not 0 < size <= BLOCK_MAX:
            return None
        if self.m.engine.read(UC_CR0) & CR0_PG:
            try:
                return self.m.read_linear(address, size)
            except GuestFault:
                return None
        if uclib.uc_mem_read(self._uch, address, self._buf, size):
            return None                             # outside mapped memory: Unicorn raises the fault
        return ctypes.string_at(self._buf, size)

    def block(self, address: int, size: int) -> list[int]:
        """Classify the block at ``address`` if its bytes are new; the addresses classified (again)."""
        code = self.fetch(address, size)
        if code is None:
            return []
        key = (address, size)
        if self.blocks.get(key) == code:
            return []
        self.blocks[key] = code
        return self.classify(code, address)

    def classify(self, code: bytes, base: int) -> list[int]:
        """Classify the instructions of ``code`` at ``base`` not classified yet from the same bytes (a block
        never splits an instruction; two blocks may share instructions, which are classified once)."""
        lookup, names, raw = self.classifier.lookup, self.names, self.raw
        done = []
        for address, size, mnemonic, op_str in sweep(code, base, 32):
            offset = address - base
            data = code[offset:offset + size]
            old = raw.get(address)
            if old == data:
                continue
            if old is not None:
                self.code_changed += 1          # the guest rewrote its code (or runs other code there now)
            raw[address] = data
            if mnemonic == BAD:
                names.pop(address, None)        # Unicorn will raise #UD there; nothing to classify
                continue
            entry = lookup(code, offset, 32, mnemonic, op_str)
            names[address] = entry.name if entry is not None else None
            self.decoded += 1
            done.append(address)
        return done

    def name_at(self, address: int, size: int) -> str | None:
        """The name of one instruction, classifying it if its block could not be fetched at block entry."""
        if address not in self.raw:
            code = self.fetch(address, size)
            if code is not None:
                self.classify(code, address)
        return self.names.get(address)


class Watch:
    """``on_insn(address, name)`` before every execution of the instructions named in ``names``."""

    def __init__(self, machine: Machine, names: Iterable[str], on_insn: Callable[[int, str], None],
                 kind: str, classifier: Classifier | None = None):
        """``kind``: the event kind under which the watch counts its own work (``blocks-rescanned``)."""
        if classifier is None:
            from popek.isa import bundled_classifier
            classifier = bundled_classifier(extended=True)
        self.m, self.names, self.on_insn = machine, frozenset(names), on_insn
        unknown = self.names - set(classifier.isa.instructions)
        assert not unknown, f"not in the ISA description: {sorted(unknown)}"
        self.decoder = BlockDecoder(machine, classifier)
        self.hooked: dict[int, int] = {}        # instruction address -> code hook handle
        self._rescans = machine.events.counter(kind)
        machine.uc.hook_add(unicorn.UC_HOOK_BLOCK, self._on_block, None, *ALL)

    def _on_block(self, uc, address: int, size: int, _) -> None:
        changed = self.decoder.block(address, size)
        if not changed:
            return
        names, new = self.decoder.names, False
        for at in changed:
            if names.get(at) in self.names and at not in self.hooked:
                self.hooked[at] = uc.hook_add(unicorn.UC_HOOK_CODE, self._on_insn, None, at, at)
                new = True
        if new:
            self._rescans["blocks-rescanned"] += 1
            uc.ctl_remove_cache(address, address + size)
            self.m.stop_chunk()

    def _on_insn(self, uc, address: int, size: int, _) -> None:
        name = self.decoder.names.get(address)
        if name in self.names:                  # not if the code changed since the hook was added
            self.on_insn(address, name)
