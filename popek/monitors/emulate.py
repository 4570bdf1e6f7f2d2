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
once per address and contents, by the machine's ``BlockDecoder`` (``popek.machine.watch``): checked
against the guest's current code once per executed block, so self-modifying code never leaves a stale
classification.

Events (``machine.events``): ``interpret`` — ``instructions`` (every instruction the monitor stepped; equal
to ``guest_instructions``, which counts a faulting instruction once per attempt), ``decoded``
(instructions classified) and ``code-changed`` (addresses classified again because their bytes changed);
``sensitive`` — executions by canonical name.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import unicorn

from popek.isa import bundled_classifier
from popek.machine.watch import ALL, BlockDecoder
from popek.monitors.base import MonitorOps

if TYPE_CHECKING:
    from popek.machine.machine import Machine

_MISSING = object()                 # an address not decoded yet (None means decoded, not listed)


class Emulate(MonitorOps):
    """Interpret every guest instruction (see the module docstring)."""

    name = "emulate"

    def __init__(self):
        self.classifier = bundled_classifier()
        self.sensitive: Counter = Counter()
        self.interpreted = 0

    # --- MonitorOps --------------------------------------------------------------------------------------
    def attach(self, machine: Machine) -> None:
        decoder = self.decoder = BlockDecoder(machine, self.classifier)
        names, sensitive = decoder.names, self.sensitive

        def on_block(uc, address: int, size: int, _) -> None:
            decoder.block(address, size)

        def on_insn(uc, address: int, size: int, _) -> None:
            self.interpreted += 1
            name = names.get(address, _MISSING)
            if name is None:
                return
            if name is _MISSING:
                name = decoder.name_at(address, size)
                if name is None:
                    return
            sensitive[name] += 1

        def on_take_off(eip: int) -> None:
            # Unicorn ran a store into the running block twice and the machine took one attempt off its
            # count; the interpreter dispatches once per instruction the CPU runs, so it takes it off too.
            self.interpreted -= 1
            name = names.get(eip)
            if isinstance(name, str):
                sensitive[name] -= 1

        machine.selfmod.on_take_off.append(on_take_off)
        machine.uc.hook_add(unicorn.UC_HOOK_BLOCK, on_block, None, *ALL)
        machine.uc.hook_add(unicorn.UC_HOOK_CODE, on_insn, None, *ALL)

    def detach(self, machine: Machine) -> None:
        events, decoder = machine.events, self.decoder
        events.count("interpret", "instructions", self.interpreted)
        events.count("interpret", "decoded", decoder.decoded)
        if decoder.code_changed:
            events.count("interpret", "code-changed", decoder.code_changed)
        for name, n in self.sensitive.items():
            if n:
                events.count("sensitive", name, n)
