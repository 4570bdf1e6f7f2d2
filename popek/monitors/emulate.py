"""``emulate``: the pure interpreter, the baseline that Popek-Goldberg's *efficiency* property rules out.

Every guest instruction passes through the monitor before it runs: a Python ``UC_HOOK_CODE`` over the whole
32-bit address space looks the instruction up, counts it, and counts it again by canonical name (DESIGN
§3.1) when the ISA description lists it (sensitive-unprivileged, privileged or I/O). Nothing runs directly
on the "hardware" without the monitor's say; so the monitor is trivially equivalent and in control, and it
is as slow as the hook (REFERENCES: a Python code hook on every instruction runs at about 2.4 M
instructions/s, against 1-2 G/s for the bare machine). It is the yardstick for what binary translation saves.

What interprets and what executes. The monitor's work per instruction is the interpreter's dispatch: fetch
(from a decode cache), classify, account. The semantics of each instruction are then carried out by
Unicorn's own interpreter on the same machine state, so the guest-visible results cannot differ from
``native``; the point of this monitor is the cost and the counts, not a second x86 semantics in Python.

Decode cache. An instruction is classified (``popek.isa.classify.Classifier``, the scanner's classifier)
once per address and contents. The cache is checked against the guest's current code once per executed
block: a ``UC_HOOK_BLOCK`` fetches the block's bytes (one raw read, ~0.4 µs, amortised over the block);
a block not seen with these bytes is swept, and each instruction in it whose bytes differ from the ones
it was classified from is classified again. Self-modifying code therefore never leaves a
stale classification: a guest store into code makes Unicorn end and retranslate the block, and the new
block is fetched before its first instruction runs. Block bytes are read physically while paging is off and
through the guest's page tables while it is on (the monitor rereads CR0 after every instruction that can
change it: ``mov_cr``, ``lmsw``, ``clts``).

Events (``machine.events``): ``interpret`` — ``instructions`` (every instruction the monitor stepped; equal
to ``guest_instructions``, which counts a faulting instruction once per attempt), ``decoded``
(instructions classified) and ``code-changed`` (addresses classified again because their bytes changed);
``sensitive`` — executions by canonical name.
"""
from __future__ import annotations

import ctypes
from collections import Counter
from functools import lru_cache
from typing import TYPE_CHECKING

import unicorn
from unicorn.unicorn_py3.unicorn import uclib

from popek.decode import BAD, sweep
from popek.machine.faults import GuestFault
from popek.machine.memory import CR0_PG
from popek.monitors.base import MonitorOps

if TYPE_CHECKING:
    from popek.isa.classify import Classifier
    from popek.machine.machine import Machine

ALL = (0, 0xFFFFFFFF)               # hook range: every linear address
_MISSING = object()                 # an address not decoded yet (None means decoded, not listed)
_CR0_WRITERS = frozenset({"mov_cr", "lmsw", "clts"})
_BLOCK_MAX = 4096                   # a translated block is far smaller (QEMU caps it at 512 instructions)


@lru_cache(maxsize=1)
def classifier() -> Classifier:
    """The bundled IA-32 description under the ``ia32`` model (built once per process: ~50 ms)."""
    from popek.isa import language
    from popek.isa.classify import Classifier
    return Classifier(language.bundled(), "ia32")


class Emulate(MonitorOps):
    """Interpret every guest instruction (see the module docstring)."""

    name = "emulate"

    def __init__(self):
        self.classifier = classifier()
        self.names: dict[int, str | None] = {}     # instruction address -> canonical name or None
        self.raw: dict[int, bytes] = {}            # instruction address -> the bytes it was classified from
        self.blocks: dict[tuple[int, int], bytes] = {}
        self.sensitive: Counter = Counter()
        self.interpreted = 0
        self.decoded = 0
        self.code_changed = 0
        self._paging = False
        self._recheck_cr0 = False
        self._machine: Machine | None = None

    # --- MonitorOps --------------------------------------------------------------------------------------
    def attach(self, machine: Machine) -> None:
        self._machine = machine
        self._paging = bool(machine.reg("cr0") & CR0_PG)
        uch, buf, read = machine.uc._uch, ctypes.create_string_buffer(_BLOCK_MAX), uclib.uc_mem_read
        string_at, blocks = ctypes.string_at, self.blocks

        def on_block(uc, address: int, size: int, _) -> None:
            if self._recheck_cr0:
                self._recheck_cr0 = False
                self._paging = bool(machine.reg("cr0") & CR0_PG)
            if not 0 < size <= _BLOCK_MAX:
                return
            if self._paging:
                try:
                    code = machine.read_linear(address, size)
                except GuestFault:
                    return                      # the fetch faults for the guest too; nothing to decode
            elif read(uch, address, buf, size):
                return                          # outside mapped memory: Unicorn raises the fault
            else:
                code = string_at(buf, size)
            key = (address, size)
            if blocks.get(key) == code:
                return
            blocks[key] = code
            self._decode(code, address)

        names, sensitive = self.names, self.sensitive

        def on_insn(uc, address: int, size: int, _) -> None:
            self.interpreted += 1
            name = names.get(address, _MISSING)
            if name is None:
                return
            if name is _MISSING:
                name = self._decode_one(address, size)
                if name is None:
                    return
            sensitive[name] += 1
            if name in _CR0_WRITERS:
                self._recheck_cr0 = True

        machine.uc.hook_add(unicorn.UC_HOOK_BLOCK, on_block, None, *ALL)
        machine.uc.hook_add(unicorn.UC_HOOK_CODE, on_insn, None, *ALL)

    def detach(self, machine: Machine) -> None:
        events = machine.events
        events.count("interpret", "instructions", self.interpreted)
        events.count("interpret", "decoded", self.decoded)
        if self.code_changed:
            events.count("interpret", "code-changed", self.code_changed)
        for name, n in self.sensitive.items():
            events.count("sensitive", name, n)

    # --- decoding ------------------------------------------------------------------------------------------
    def _decode(self, code: bytes, base: int) -> None:
        """Classify the instructions of a block not classified yet from the same bytes (a block never
        splits an instruction; two blocks may share instructions, which are classified once)."""
        lookup, names, raw = self.classifier.lookup, self.names, self.raw
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

    def _decode_one(self, address: int, size: int) -> str | None:
        """An instruction whose block could not be fetched at block entry (rare: a fetch that faults)."""
        try:
            code = self._machine.read_linear(address, size)
        except GuestFault:
            return None
        self._decode(code, address)
        return self.names.get(address)
