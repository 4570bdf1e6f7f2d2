"""Translate: guest code at (EIP, key) into the translation cache (QEMU's translator loop, for ``bt``).

**Counting.** The machine's clock is its instruction counter, so each guest instruction must be exactly one
counted cache instruction: glue (popek.monitors.bt_emit) goes to the region the counter skips, and no
guest instruction may be followed by a jump that is not its own. Hence the layout:

- A *run* is one translation: up to ``max_run`` guest instructions from one guest address, in one guest
  page, laid out back to back as *units* of at most ``cap`` instructions (12, as VMware's translation
  units). A unit ends at a conditional branch (its taken exit is the branch itself, the fall-through the
  next unit), at a callout, at a call or loop instruction (their glue has the exits) or at ``cap``; the
  run goes on with the next unit, which execution reaches by falling through.
- The run ends at an unconditional transfer (jmp, ret, indirect jmp, iret, far jmp/ret), at the end of the
  page, at ``max_run``, before code that cannot be fetched or decoded, or before code translated already. Where execution would fall out of
  the run, its last guest instruction is moved into glue and followed there by an exit: the unit holds a
  counted ``jmp`` that stands for that instruction (a copied instruction runs the same anywhere: IA-32 has
  no EIP-relative data addressing; a conditional branch becomes ``jcc``/``jmp`` with two exits). A callout
  at the end of a run continues through the monitor; a ``rep`` string instruction (counted once per
  iteration, so it must stay counted) is followed by a ``continue`` callout the monitor does not count.

Per guest instruction (decoded by popek.decode, classified by popek.isa.classify through the classifier the
emulation routines use):

| guest instruction                    | cache (counted)    | glue (not counted)                                |
|--------------------------------------|--------------------|---------------------------------------------------|
| innocuous, cpuid, rdpmc, int1        | the same bytes     |                                                   |
|                                      | (IDENT)            |                                                   |
| one with an emulation routine        | ``syscall``        | (a callout; its recipe decoded now, once)         |
| ins/outs (with rep or not)           | IDENT              | (the machine's port hooks, which ask the monitor  |
|                                      |                    | (io_allowed) with the virtual CPU: a rep counts   |
|                                      |                    | and can be interrupted per element, as natively)  |
| jmp rel                              | jmp rel32 -> exit  | exit stub                                         |
| jcc rel                              | jcc rel32 -> exit  | exit stub; the fall-through is the next unit      |
| call rel                             | jmp -> glue        | push guest return address; jmp -> exit            |
| ret, ret n, call r/m                 | jmp -> glue        | inline lookup (popek.monitors.bt_emit.Lookup)     |
| jmp r/m (its lookup would leave the  | ``syscall``        | (the monitor carries it out: emulation.near)      |
| target below ESP in guest RAM)       |                    |                                                   |
| loop, loope, loopne, jecxz           | jmp -> glue        | lea ecx,[ecx-1]; jecxz; jcc/jmp -> two exits      |
| near branch with a 16-bit operand or | ``syscall``        | (the same)                                        |
| address size (66; 67 on loop/jecxz)  |                    |                                                   |
| a store of FIP (FIP_STORES: fnstenv, | jmp -> glue        | ``syscall`` (the monitor puts the guest's EIP in  |
| fnsave, fxsave, xsave...)            |                    | FIP); the instruction; jmp back (or an exit)      |

Control transfers are recognised by opcode (popek.decode.near_transfer), never by the printed mnemonic,
which carries prefix words (``bnd ret``, ``notrack jmp eax``): a prefixed branch is translated as the
branch it is.

Addresses: units, exits and the index are keyed by *linear* guest addresses; what the guest sees (pushed
return addresses, recipes) is EIP = linear - CS base.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from popek.decode import COUNTER_KINDS, LEGACY_PREFIXES, NearTransfer, decode_at, near_transfer, \
    opcode_and_modrm
from popek.machine import quirks
from popek.machine.faults import GP, PF, GuestFault
from popek.machine.memory import CR0_PG
from popek.monitors import bt_emit as emit
from popek.monitors import bt_routines
from popek.monitors.bt_routines import TABLE
from popek.monitors.bt_cache import PAGE, CodeCache, Exit, LookupSite, Site, Unit

ENDS_RUN = frozenset({"iret", "ret_far", "jmp_far", "sysenter", "sysexit"})    # never continue at the next one
STRING_IO = frozenset({"ins", "outs"})
STRING_OPS = frozenset(b"\xa4\xa5\xa6\xa7\xaa\xab\xac\xad\xae\xaf\x6c\x6d\x6e\x6f")
UD2 = b"\x0f\x0b"
# Stores of the x87 state that write FIP, the EIP of the last x87 instruction (fnstenv, fnsave, fxsave,
# xsave, xsaveopt, xsavec, xsaves: opcode after prefixes, ModRM reg, memory forms only): in the cache that
# instruction ran at a cache address, which the store would hand the guest (the fnstenv GetPC of encoded
# shellcode read it as its own EIP). SDM Vol. 1, 8.1.8 (x87 FPU instruction and data pointers).
FIP_STORES = frozenset({(b"\xd9", 6), (b"\xdd", 6), (b"\x0f\xae", 0), (b"\x0f\xae", 4), (b"\x0f\xae", 6),
                        (b"\x0f\xc7", 4), (b"\x0f\xc7", 5)})


def stores_fip(raw: bytes) -> bool:
    op, modrm = opcode_and_modrm(raw, 0, 32)
    return modrm is not None and modrm >> 6 != 3 and (op, (modrm >> 3) & 7) in FIP_STORES


class CacheFull(Exception):
    """The run does not fit: the caller flushes the cache and translates again."""


class Untranslatable(Exception):
    """Code the translator does not handle (16-bit code segments): the caller ends the run."""


@dataclass
class Run:
    """One translation, built in local buffers and installed at the end (nothing is registered before)."""

    start: int                               # cache address of the first unit
    code: bytearray = field(default_factory=bytearray)
    units: list = field(default_factory=list)
    glue: list = field(default_factory=list)     # [address, bytes, guest address of the instruction]
    sites: dict = field(default_factory=dict)
    tail: tuple | None = None                # (cache address, guest address) of a closing ``continue``
    fills: list = field(default_factory=list)   # (LookupSite, guest EIP, cache target) known in advance
    instructions: int = 0

    @property
    def here(self) -> int:
        return self.start + len(self.code)


@dataclass
class Pending:
    """The last instruction decoded: emitted in place if the run goes on, moved to glue if it ends there."""

    insn: object
    unit: Unit
    name: str | None                         # canonical name, if the ISA description lists it
    prefixes: int                            # number of legacy prefix bytes
    flow: NearTransfer | None                # a near jmp/call/jcc/ret/loop, by its opcode (decode.near_transfer)
    fip: bool = False                        # stores FIP (FIP_STORES)

    @property
    def jcc(self) -> bool:
        return self.flow is not None and self.flow.kind == "jcc" and not self.flow.sized16

    @property
    def branch16(self) -> bool:
        """A near branch with a 16-bit EIP or counter: carried out by the monitor (popek.monitors.emulation.near)."""
        return self.flow is not None and self.flow.sized16


class Translator:
    def __init__(self, machine, vcpu, cache: CodeCache, *, cap: int = 12, ways: int = 4, max_run: int = 48):
        assert cap >= 1 and max_run >= 1
        self.m, self.v, self.cache = machine, vcpu, cache
        self.cap, self.ways, self.max_run = cap, ways, max_run
        self.classifier = bt_routines.classifier()
        self.instructions = 0               # guest instructions translated, in total
        self.runs = 0
        self.units = 0
        self._glue_next = 0

    # --- reading guest code -----------------------------------------------------------------------------
    def _fetch(self, linear: int, size: int) -> bytes:
        """Up to ``size`` bytes of guest code at ``linear`` (fewer where it stops being fetchable: only guest
        RAM holds code; monitor memory is not executable on the bare machine either)."""
        m, v = self.m, self.v
        while size:
            try:
                if v.cr0 & CR0_PG:
                    space = v.space(m, mark=False)      # reading ahead: no access the guest made
                    if m.memory.in_ram(space.physical(linear, size), size):
                        return space.read(linear, size)
                elif m.memory.in_ram(linear, size):
                    return m.memory.read(linear, size)
            except GuestFault:
                pass
            size = size // 2 if size > 16 else size - 1
        return b""

    def _fetched(self, linear: int) -> None:
        """The guest is about to execute at ``linear``: the page walk its fetch makes natively, which sets
        the accessed bits and raises the #PF (a user fetch's error code at CPL 3) when the page is absent."""
        v = self.v
        if not v.cr0 & CR0_PG:
            return
        try:
            v.space(self.m).physical(linear, 1)
        except GuestFault as fault:
            if fault.vector == PF and v.cpl == 3 and fault.error_code is not None:
                fault.error_code |= 4
            raise

    # --- the loop -----------------------------------------------------------------------------------------
    def translate(self, eip: int, key: tuple) -> tuple[Run, int]:
        """Translate from linear ``eip``; returns the installed run and the cache address of ``eip``.

        Raises GuestFault when not even the first instruction can be fetched (the guest gets the fault the
        fetch raises natively), CacheFull when the run does not fit, Untranslatable for 16-bit code."""
        if not key[2]:
            raise Untranslatable("16-bit code segment")
        cache = self.cache
        self._glue_next = cache.glue_next
        self._window, self._window_at = b"", eip
        self._fetched(eip)
        if self._decode(eip) is None and not self._window:
            raise GuestFault(GP, 0, f"fetch at {eip:#x} outside guest RAM")
        run = Run(cache.unit_next)
        pos, unit, in_unit, pending = eip, None, 0, None
        page = eip // PAGE                          # the page straight-line code must stay in
        returns: list[int] = []                     # guest return addresses of the calls traced into
        while True:
            insn = self._decode(pos)
            if pending is None and insn is None:    # the first instruction: #UD here, as natively
                self._fetch_rest(pos)
                unit = self._unit(run, key, pos)
                self._emit(run, unit, pos, UD2, pos + 1)
                break
            translated = pending is not None and cache.index.get((pos, key))
            if insn is None or run.instructions >= self.max_run or pos // PAGE != page or translated:
                # ... or at code translated already (not a traced call's target: pending is None there, and
                # the trace is the point), to which an exit chains. Translating it again would leave
                # one more live copy of it per retranslation of the code before it (a store into the next
                # instruction in a loop retranslates every iteration: work quadratic in the iterations).
                self._close(run, pending, key, pos)
                break
            if pending is not None:
                self._inline(run, pending, key)
                if self._ends_unit(pending) or in_unit >= self.cap:
                    unit, in_unit = None, 0
            if unit is None:
                unit = self._unit(run, key, pos)
            run.instructions += 1
            in_unit += 1
            pending = self._classify(insn, unit)
            pos = (pos + insn.size) & 0xFFFFFFFF
            unit.guest_end = pos
            if not self._transfer(pending):
                continue
            traced = self._trace(run, pending, key, returns) if run.instructions < self.max_run else None
            if traced is None:
                self._final(run, pending, key)
                break
            pos, page, unit, in_unit, pending = traced, traced // PAGE, None, 0, None
        for u in run.units:
            if not u.cache_end:
                u.cache_end = run.here
            u.phys = tuple((lp, self._physical_page(lp)) for lp in u.pages)
        if not cache.room(len(run.code), self._glue_next - cache.glue_next):
            raise CacheFull()
        self._install(run)
        self.instructions += run.instructions
        self.runs += 1
        self.units += len(run.units)
        return run, cache.index[(eip, key)]

    def _physical_page(self, linear_page: int) -> int:
        if not self.v.cr0 & CR0_PG:
            return linear_page
        try:
            return self.v.space(self.m, mark=False).physical(linear_page * PAGE, 1) // PAGE
        except GuestFault:
            return linear_page              # not mapped: nothing can write it through this address either

    def _fetch_rest(self, pos: int) -> None:
        """An instruction that reaches past the bytes that could be fetched (into a page not present, or
        outside RAM) faults on that fetch before any decoding fault (SDM vol. 3 6.9, the priority of a code
        page fault over #UD): raise it. Zeros stand in for the missing bytes to find its length."""
        have = self._window[pos - self._window_at:] if pos >= self._window_at else b""
        if len(have) >= 15:
            return
        insn = decode_at(have + bytes(15 - len(have)), 0, pos, 32)
        if insn is None or insn.size <= len(have):
            return
        missing = (pos + len(have)) & 0xFFFFFFFF
        self._fetched(missing)
        raise GuestFault(GP, 0, f"fetch at {missing:#x} outside guest RAM")

    def _decode(self, pos: int):
        """The instruction at linear ``pos``, or None where it cannot be fetched whole or decoded."""
        off = pos - self._window_at
        if off < 0 or off + 15 > len(self._window):
            self._window, self._window_at, off = self._fetch(pos, PAGE - pos % PAGE + 15), pos, 0
        if off >= len(self._window):
            return None
        insn = decode_at(self._window, off, self._window_at, 32)
        if insn is None or off + insn.size > len(self._window):
            return None
        quirk = quirks.match(self._window, off)
        if quirk is not None and quirk.action == quirks.UD:     # #UD on the CPU, whatever Unicorn would do
            return None
        return insn

    def _trace(self, run: Run, p: Pending, key: tuple, returns: list[int]) -> int | None:
        """Follow a direct call into its target, and a plain return back to the call it came from, so that
        a loop calling a small function is one run. Returns where the run goes on, or None (the transfer
        gets its ordinary translation and the run ends)."""
        insn, unit, flow = p.insn, p.unit, p.flow
        next_ip = (insn.address + insn.size) & 0xFFFFFFFF
        if flow is None or p.branch16:
            return None
        if flow.kind == "call":
            target = flow.target(next_ip)
            if self._decode(target) is None:
                return None
            try:
                self._fetched(target)
            except GuestFault:
                return None
            self._emit(run, unit, insn.address, emit.push_imm(next_ip - key[1]), next_ip)
            returns.append(next_ip)
            return target
        if flow.kind == "ret" and returns and self._decode(returns[-1]) is not None:
            back = returns.pop()
            layout = emit.Lookup("ret", self.ways, release=flow.release)
            lookup = self._lookup(run, unit, layout, insn.address, next_ip)
            run.fills.append((lookup, (back - key[1]) & 0xFFFFFFFF, run.here + 5))   # glue compares EIPs
            self._emit(run, unit, insn.address, emit.jmp(run.here, lookup.at), next_ip)
            return back
        return None

    def _lookup(self, run: Run, unit: Unit, layout: emit.Lookup, address: int, next_ip: int) -> LookupSite:
        glue = self._glue(run, layout.code(self._glue_next, []), address)
        lookup = LookupSite(unit, glue, layout, address)
        unit.lookups.append(lookup)
        run.sites[glue + layout.callout_at] = Site("lookup", address, next_ip, unit, lookup=lookup)
        return lookup

    def _unit(self, run: Run, key: tuple, pos: int) -> Unit:
        if run.units:
            run.units[-1].cache_end = run.here
        unit = Unit(key, pos, pos, run.here)
        run.units.append(unit)
        return unit

    def _classify(self, insn, unit: Unit) -> Pending:
        raw = insn.raw
        prefixes = 0
        while prefixes < len(raw) and raw[prefixes] in LEGACY_PREFIXES:
            prefixes += 1
        entry = self.classifier.lookup(raw, 0, 32, insn.mnemonic, insn.op_str)
        name = entry.name if entry is not None else None
        return Pending(insn, unit, name, prefixes, near_transfer(raw) if name not in TABLE else None,
                       name is None and stores_fip(raw))

    def _callout(self, p: Pending, key: tuple) -> bool:
        return p.name is not None and p.name in TABLE and p.name not in STRING_IO

    def _transfer(self, p: Pending) -> bool:
        """Instructions translated at once, with their own exits (nothing falls through them in the cache)."""
        if p.name is not None and p.name in TABLE:
            return p.name in ENDS_RUN
        return p.flow is not None and not p.jcc

    def _ends_unit(self, p: Pending) -> bool:
        return p.jcc or (p.name is not None and p.name in TABLE)

    # --- emitting -----------------------------------------------------------------------------------------
    def _emit(self, run: Run, unit: Unit, guest: int, code: bytes, guest_end: int) -> int:
        at = run.here
        unit.insns.append((at, guest))
        run.code += code
        if unit.guest_end < guest_end:
            unit.guest_end = guest_end
        return at

    def _glue(self, run: Run, code: bytes, guest: int) -> int:
        at = self._glue_next
        self._glue_next += len(code)
        run.glue.append([at, code, guest])
        return at

    def _exit(self, run: Run, unit: Unit, insn_address: int, target: int, slot: int) -> int:
        """An exit of ``unit`` to linear ``target`` through the rel32 at ``slot``; returns its stub."""
        stub = self._glue(run, emit.stub(), insn_address)
        exit = Exit(unit, target & 0xFFFFFFFF, slot, stub)
        unit.exits.append(exit)
        run.sites[stub] = Site("exit", insn_address, target & 0xFFFFFFFF, unit, exit=exit)
        return stub

    def _site(self, run: Run, at: int, p: Pending, key: tuple, kind: str = "emulate") -> None:
        insn = p.insn
        next_ip = (insn.address + insn.size) & 0xFFFFFFFF
        if kind == "emulate":
            recipe = bt_routines.decode(insn.raw, (insn.address - key[1]) & 0xFFFFFFFF)
            run.sites[at] = Site(kind, insn.address, next_ip, p.unit, recipe=recipe,
                                 routine=bt_routines.routine(recipe.name))
        else:                                       # near-branch: the instruction's bytes, for the routine
            run.sites[at] = Site(kind, insn.address, next_ip, p.unit, recipe=insn.raw)

    def _inline(self, run: Run, p: Pending, key: tuple) -> None:
        """``p`` in place, execution going on to the next instruction in the run."""
        insn, unit = p.insn, p.unit
        next_ip = (insn.address + insn.size) & 0xFFFFFFFF
        if self._callout(p, key):
            self._callout_glue(run, p, key, back=True)
        elif p.fip:
            self._fip_glue(run, p, None)
        elif p.jcc:
            at = self._emit(run, unit, insn.address, bytes(6), next_ip)
            stub = self._exit(run, unit, insn.address, p.flow.target(next_ip), at + 2)
            run.code[at - run.start:at - run.start + 6] = emit.jcc(at, p.flow.cond, stub)
        else:
            self._emit(run, unit, insn.address, insn.raw, next_ip)

    def _close(self, run: Run, p: Pending, key: tuple, pos: int) -> None:
        """The run ends after ``p`` without a transfer of its own: execution continues at guest ``pos``."""
        insn, unit = p.insn, p.unit
        next_ip = (insn.address + insn.size) & 0xFFFFFFFF
        if self._callout(p, key):                       # the monitor continues it at ``pos``
            self._callout_glue(run, p, key, back=False)
            return
        if p.fip:
            self._fip_glue(run, p, pos)
            return
        if p.jcc:                                       # jcc taken / not taken: two exits, in glue
            glue = self._reserve(11)
            code = bytearray(11)
            taken = self._exit(run, unit, insn.address, p.flow.target(next_ip), glue + 2)
            fall = self._exit(run, unit, insn.address, pos, glue + 7)
            code[:6] = emit.jcc(glue, p.flow.cond, taken)
            code[6:] = emit.jmp(glue + 6, fall)
            self._glue_at(run, glue, bytes(code), insn.address)
            self._emit(run, unit, insn.address, emit.jmp(run.here, glue), next_ip)
            return
        if p.insn.raw[p.prefixes] in STRING_OPS and any(b in (0xF2, 0xF3) for b in insn.raw[:p.prefixes]):
            self._emit(run, unit, insn.address, insn.raw, next_ip)      # counted per iteration: stays
            at = run.here
            run.code += emit.INT_CONTINUE             # in the unit, after a flag-setting rep: see bt_emit
            run.sites[at + len(emit.INT_CONTINUE)] = Site("continue", pos, pos, unit)
            run.tail = (at, pos)
            return
        glue = self._reserve(len(insn.raw) + 5)         # moved: counted jmp here, the copy and the exit there
        fall = self._exit(run, unit, insn.address, pos, glue + len(insn.raw) + 1)
        self._glue_at(run, glue, insn.raw + emit.jmp(glue + len(insn.raw), fall), insn.address)
        self._emit(run, unit, insn.address, emit.jmp(run.here, glue), next_ip)

    def _callout_glue(self, run: Run, p: Pending, key: tuple, back: bool, kind: str = "emulate") -> None:
        """A callout: a counted ``jmp`` in the unit stands for the instruction; the ``syscall`` starts a
        glue block (see bt_emit: a block start is where Unicorn keeps the guest's flags intact), followed,
        when execution may go on in this run (``back``), by a jump to the next unit."""
        insn = p.insn
        next_ip = (insn.address + insn.size) & 0xFFFFFFFF
        at = self._emit(run, p.unit, insn.address, bytes(5), next_ip)
        glue = self._reserve(len(emit.SYSCALL) + 5)
        self._glue_at(run, glue, emit.SYSCALL, insn.address)
        # After the callout, EIP (a chunk may stop there) stands for the next guest instruction.
        after = glue + len(emit.SYSCALL)
        self._glue_at(run, after, emit.jmp(after, at + 5) if back else emit.INT3 * 5, next_ip)
        run.code[at - run.start:at - run.start + 5] = emit.jmp(at, glue)
        self._site(run, glue, p, key, kind)
        if not back and kind == "emulate":
            run.sites[glue].kind = "emulate-last"

    def _fip_glue(self, run: Run, p: Pending, pos: int | None) -> None:
        """A store of FIP (FIP_STORES): a counted ``jmp`` in the unit stands for it; in glue a callout first
        puts back the guest EIP of the last x87 instruction, then the instruction runs as itself, and a
        jump goes back to the unit or, at the end of the run (``pos``), to an exit."""
        insn, unit = p.insn, p.unit
        next_ip = (insn.address + insn.size) & 0xFFFFFFFF
        at = self._emit(run, unit, insn.address, bytes(5), next_ip)
        glue = self._reserve(len(emit.SYSCALL) + insn.size + 5)
        copy = glue + len(emit.SYSCALL)
        after = copy + insn.size
        back = at + 5 if pos is None else self._exit(run, unit, insn.address, pos, after + 1)
        self._glue_at(run, glue, emit.SYSCALL + insn.raw, insn.address)
        self._glue_at(run, after, emit.jmp(after, back), next_ip)
        run.code[at - run.start:at - run.start + 5] = emit.jmp(at, glue)
        run.sites[glue] = Site("fip", insn.address, next_ip, unit)

    def _reserve(self, size: int) -> int:
        at = self._glue_next
        self._glue_next += size
        return at

    def _glue_at(self, run: Run, at: int, code: bytes, guest: int) -> None:
        """Glue reserved (``_reserve``) before the stubs of its exits were allocated behind it."""
        run.glue.append([at, code, guest])

    def _final(self, run: Run, p: Pending, key: tuple) -> None:
        """A transfer, with its own exits; the run ends with it (a call's return address is translated when
        the return gets there)."""
        insn, unit, flow = p.insn, p.unit, p.flow
        raw, address = insn.raw, insn.address
        next_ip = (address + insn.size) & 0xFFFFFFFF
        base = key[1]
        if self._callout(p, key):
            self._callout_glue(run, p, key, back=False)
        elif p.branch16 or flow.kind == "jmp_rm":
            # jmp r/m32 too: an inline lookup would leave the target's slot below ESP changed in guest RAM
            self._callout_glue(run, p, key, back=False, kind="near-branch")
        elif flow.kind == "jmp":
            at = self._emit(run, unit, address, bytes(5), next_ip)
            stub = self._exit(run, unit, address, flow.target(next_ip), at + 1)
            run.code[at - run.start:at - run.start + 5] = emit.jmp(at, stub)
        elif flow.kind == "call":
            glue = self._reserve(10)
            stub = self._exit(run, unit, address, flow.target(next_ip), glue + 6)
            self._glue_at(run, glue, emit.push_imm(next_ip - base) + emit.jmp(glue + 5, stub), address)
            self._emit(run, unit, address, emit.jmp(run.here, glue), next_ip)
        elif flow.kind in COUNTER_KINDS:
            self._loop(run, unit, insn, flow, next_ip)
        else:                                           # ret, ret n, call r/m32
            if flow.kind == "ret":
                layout = emit.Lookup("ret", self.ways, release=flow.release)
            else:
                layout = emit.Lookup(flow.kind[:-3], self.ways, prologue=emit.push_rm(raw, flow.opcode_at),
                                     ret_to=(next_ip - base) & 0xFFFFFFFF)
            lookup = self._lookup(run, unit, layout, address, next_ip)
            self._emit(run, unit, address, emit.jmp(run.here, lookup.at), next_ip)

    def _loop(self, run: Run, unit: Unit, insn, flow: NearTransfer, next_ip: int) -> None:
        """loop/loope/loopne/jecxz through glue, with two exits (taken, fall-through)."""
        address, mnemonic = insn.address, flow.kind
        target = flow.target(next_ip)
        code = bytearray()
        if mnemonic == "jecxz":                         # jecxz T; jmp F; T: jmp T
            glue = self._reserve(12)
            code += emit.jecxz(glue, glue + 7)
            code += emit.jmp(glue + 2, self._exit(run, unit, address, next_ip, glue + 3))
            code += emit.jmp(glue + 7, self._exit(run, unit, address, target, glue + 8))
        else:                                           # lea ecx,[ecx-1]; jecxz F; jmp/jz/jnz T; F: jmp F
            jump = 5 if mnemonic == "loop" else 6
            glue = self._reserve(3 + 2 + jump + 5)
            fall = glue + 5 + jump
            code += emit.DEC_ECX + emit.jecxz(glue + 3, fall)
            taken = self._exit(run, unit, address, target, glue + 5 + jump - 4)
            code += emit.jmp(glue + 5, taken) if mnemonic == "loop" else \
                emit.jcc(glue + 5, 4 if mnemonic == "loope" else 5, taken)
            code += emit.jmp(fall, self._exit(run, unit, address, next_ip, fall + 1))
        self._glue_at(run, glue, bytes(code), address)
        self._emit(run, unit, address, emit.jmp(run.here, glue), next_ip)

    # --- installing ---------------------------------------------------------------------------------------
    def _install(self, run: Run) -> None:
        cache = self.cache
        cache.write(run.start, bytes(run.code))
        cache.unit_next = run.start + len(run.code)
        for at, code, guest in sorted(run.glue):
            cache.write(at, code)
            cache.add_glue(at, at + len(code), guest)
        cache.glue_next = self._glue_next
        for unit in run.units:
            cache.add_unit(unit)
        if run.tail is not None:
            cache.guest_of[run.tail[0]] = run.tail[1]
        cache.sites.update(run.sites)
        for lookup, guest, at in run.fills:        # a traced return: its way back is known already
            target = cache.unit_at(at)
            if target is not None:
                cache.fill(lookup, guest, target, at)
