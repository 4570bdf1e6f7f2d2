"""``bt``: full virtualization by binary translation (VMware-style: Adams & Agesen, ASPLOS 2006).

The guest never executes its own code: it executes translations of it, made on demand into a translation
cache outside guest RAM (find: ``bt_cache``; translate: ``bt_translate``; execute: this module). Innocuous
instructions are copied unchanged; every instruction with an emulation routine (the privileged and I/O ones
and the sensitive-unprivileged ones: popek.monitors.emulation) becomes a *callout*; branches are rewritten
so that execution stays in the cache (chained exits, inline lookups for returns and indirect branches).

**Privilege.** The guest kernel runs at real ring 0 (``VCpu(ring=0)``): real and virtual CPL coincide, and
so do the real and virtual IF and IOPL. What the monitor owns, like a real VMM, is the rest of the machine's
system state: the real GDTR, IDTR, LDTR and TR point at the monitor's shadow tables in monitor memory
(popek.monitors.shadow, the same ones ``trap`` uses), and CR0/CR3/CR4 follow the guest through them. The
guest cannot see that, because every instruction that reads it is a callout: ``sgdt`` stores the virtual
GDTR, ``str`` the guest's TR, ``smsw`` the virtual CR0, and so on (popek.monitors.vcpu holds the values).

**Callouts.** A callout is the 2-byte ``syscall`` instruction, at the start of a glue block that a counted
``jmp`` in the translation leads to (popek.monitors.bt_emit says why: Unicorn corrupts OF/CF/AF otherwise).
Unicorn gives ``syscall`` to an instruction hook and then ends its translated block and continues at EIP +
2, whatever the hook did (measured on 2.1.4: 0.25 µs for a hook that does nothing; ``cpuid`` would be as
cheap but cannot redirect EIP, ``int n`` can but costs 1.6 µs through the machine's exception path). So a
callout can write registers, flags, segments or EIP. The hook (bt_fast: registered without the binding's
wrappers, EIP read from Unicorn's live CPU state) finds the *site* by EIP: the recipe decoded at
translation time and the shared routine to run (bt_routines). Guest faults a routine raises are delivered
at the guest instruction through the guest's virtual IDT (``Deprivileged.reflect``); a routine that transfers
control continues through the monitor's lookup. A guest's own ``syscall`` in translated code is no site
and stays what Unicorn makes of it natively, a no-op. Port I/O that reaches the machine's own hooks
(ins/outs, copied unchanged; user code run directly) is decided by ``io_allowed`` for the virtual CPU.

**Instruction counts and interrupts.** The machine's clock is its instruction counter. Each guest
instruction is exactly one counted instruction in the cache (popek.monitors.bt_translate), and glue is not
counted (``Engine.count_only``), so timer interrupts arrive after the same guest instruction as natively.
A chunk can only stop before a counted instruction, which is always a guest instruction boundary: the
monitor maps that cache address back to the guest EIP and delivers there. Interrupts are therefore taken
only between translated instructions, at the points where a unit can be entered (every instruction start
is indexed; a return from the interrupt enters the translation in the middle).

**Precise faults.** A fault in translated code is reported to the guest at the guest address of the
faulting instruction (every cache instruction, and every glue sequence, maps back to one), with the state
before it: the glue's first instruction is the only one that can fault, and it has no side effect then.
Interrupt frames, pushed return addresses and registers only ever hold guest addresses.

**Self-modifying code** (popek.monitors.bt_guard). Guest stores into code with translations are caught by
write hooks over the physical byte ranges translations were made from; host writes (the emulation
routines, the frames of interrupt delivery) arrive through ``Memory.on_write``. Only the overlapping units
are invalidated (popek.monitors.bt_cache); a store into code stops the chunk before the next guest
instruction, which then runs from a fresh translation. Guest reads of code read guest memory, never the
cache.

**Resource control.** The cache is mapped execute-only outside guest RAM: stores fault like stores to any
address outside RAM. A read hook on the cache range (bt_guard) turns a guest read of it into the same
#GP(0) the bare machine gives for that unmapped address, and nothing of the cache reaches the guest. The guest cannot jump into the cache: every
guest branch target is a guest address, looked up or translated.

**Bounded cache.** ``cache_size`` bytes of translated code and as much again for glue (exit stubs and
inline lookups take about as much room as the code); when a translation does not fit, the whole cache is
flushed and translation starts again. The default, 1.5 MiB + 1.5 MiB less a guard page, keeps the cache inside the 4 MiB
of linear space the monitor's page table maps (with monitor memory) for a guest that pages; a larger
cache works until the guest turns paging on, when the run ends (triple fault, with the reason).

**User code.** Translated too (``direct_user=False``, the default), so that user-mode sgdt/sidt/sldt/str/
smsw and pushf see virtual values. With ``direct_user=True`` guest code at virtual CPL 3 runs untranslated,
as VMware ran it: then its sensitive instructions read the real, monitor-owned state (``popek diff GUEST
--monitor bt --direct-user`` names them).

Limits: 16-bit code segments are not translated (the run ends with a triple fault that says so); the
monitor's shadow tables stay readable in monitor memory, as the machine defines it (a guest scanning memory
above its RAM can find them, as under ``trap``); ``lds``/``les``/``lfs``/``lgs``/``lss`` are copied
unchanged and set no accessed bit in the guest's GDT; an indirect ``jmp`` through memory leaves the guest's
ECX in the dword below ESP. Single-stepping: the guest's EFLAGS.TF is virtual (set in the real flags,
Unicorn would trap after each instruction of the cache and its glue); while it is set the monitor runs
chunks of one guest instruction and delivers each #DB itself, with DR6.BS, after every iteration of a rep
string instruction as the CPU does. ``syscall`` and ``sysret`` are #UD outside 64-bit mode, as on the machine;
``sysenter`` and ``sysexit`` are callouts to their routines (the SYSENTER MSRs are kept virtual).

Events (``machine.events``): ``translation`` (runs, units, instructions, cache-bytes, glue-bytes),
``callout`` (by canonical name; ``exit``, ``lookup``, ``continue``, ``poison``), ``chain`` (patched
same-page branches) and ``lookup`` (``filled``: cross-page exits and inline lookup ways; ``hit``/``miss``:
the monitor's own guest-to-cache index), ``invalidation`` (units, by guest and host writes), ``flush``
(cache-full, address-space), ``resource`` (cache reads refused), plus what the guest's IDT receives, as for
every monitor.
"""
from __future__ import annotations

import struct
from collections import Counter
from typing import TYPE_CHECKING

from unicorn import x86_const as X

from popek.machine.faults import BP, DB, EXCEPTION, GP, PF, SOFTWARE, GuestFault, Interrupt
from popek.machine.memory import CR0_PG, PAGE
from popek.machine.result import UNSUPPORTED
from popek.monitors import bt_emit as emit
from popek.monitors.deprivilege import TABLE_CHANGES, Deprivileged
from popek.monitors.bt_cache import CodeCache
from popek.monitors.bt_fast import SteppingVCpu, hook_syscall, live_eip
from popek.monitors.bt_guard import RESYNC, Guard
from popek.monitors.bt_translate import STRING_OPS, CacheFull, Translator, Untranslatable
from popek.decode import LEGACY_PREFIXES, decode_at
from popek.monitors.emulation import TABLE as ROUTINES
from popek.monitors.emulation import near
from popek.monitors.bt_routines import peek, push

if TYPE_CHECKING:
    from popek.machine.machine import Machine

EIP = X.UC_X86_REG_EIP
FIP = X.UC_X86_REG_FIP
# Loads after which the guest's descriptor gets its accessed bit (below): what native runs write.
DATA_LOADS = frozenset({"mov_to_seg", "pop_seg"})
DELIVERIES = frozenset({"int", "int3", "into"})
# Routines that may change CS, the CPL or EIP (the rest continue at the next instruction or fault).
TRANSFERS = frozenset({"iret", "ret_far", "jmp_far", "call_far", "sysenter", "sysexit"}) | DELIVERIES
DR6_BS = 1 << 14                           # DR6: the #DB was a single step
SETS_TF = frozenset({"popf", "iret"})       # routines that can set the guest's (virtual) EFLAGS.TF
ACCESSED_BIT, CODE_OR_DATA = 1 << 8, 1 << 12
PAGING_CHANGES = frozenset({"cr0", "cr3", "cr4", "tlb"})


class BinaryTranslation(Deprivileged):
    name = "bt"
    ring = 0                                # the guest kernel at real ring 0: only the tables are the monitor's
    vcpu_type = SteppingVCpu

    def __init__(self, direct_user: bool = False, cache_size: int = 0x180000, cap: int = 12, ways: int = 4,
                 max_run: int = 48, paranoid: bool = False):
        if cache_size < 0x1000 or cache_size % 0x1000:
            raise ValueError("cache_size must be a multiple of 4 KiB")
        self.direct_user = direct_user
        self.cache_size, self.cap, self.ways, self.max_run = cache_size, cap, ways, max_run
        self.paranoid = paranoid            # tests: look for cache addresses the guest could see, at every callout
        self.callouts: Counter = Counter()
        self.counts: Counter = Counter()    # everything else, by (kind, name)
        self._flush_wanted: str | None = None
        self._accessed_known: set[tuple[int, int]] = set()
        self._base = 0                      # CS base of the translation running now (set by _goto)
        self._paging = False                # the guest's CR0.PG as last followed
        self._step = None                   # (instructions, vcpu.entry, guest EIP) at a single-stepped chunk's start

    # --- MonitorOps ---------------------------------------------------------------------------------------
    def attach(self, machine: Machine) -> None:
        super().attach(machine)
        m = self.m
        m.selfmod.disable()     # the guest runs from the cache: no guest store lands in the block running
        # glue: about as much as code, less the guard page below the cache (CodeCache), so that the default
        # still fits the monitor's 4 MiB
        self.cache = CodeCache(m, self.cache_size, max(self.cache_size - 0x1000, 0x1000))
        self._map_for_paging()
        self.translator = Translator(m, self.vcpu, self.cache, cap=self.cap, ways=self.ways, max_run=self.max_run)
        self._count_guest_only()
        uc, cache = m.uc, self.cache
        # Unicorn checks an instruction hook's range against EIP, which is CS-relative: watch every EIP
        # (a syscall outside the cache is the guest's own, a no-op as natively).
        self._syscall_hook = hook_syscall(uc, self._on_syscall)
        self._eip = live_eip(m)
        m.memory.runs_ram = self.direct_user            # only direct user code runs from guest RAM
        self.guard = Guard(m, cache, self.counts, self._key)
        self._goto(m.reg("eip"), callout=False)

    def _count_guest_only(self) -> None:
        """Make the machine's counter count guest instructions only: everything below the glue region.
        Unicorn creates its count hook in the first counted run, so run one ``hlt`` of the cache first."""
        m, cache = self.m, self.cache
        eip = m.reg("eip")
        cache.write(cache.units_start, emit.HLT)
        m.uc.emu_start(cache.units_start, 0, count=1)
        if not m.engine.count_only(0, cache.glue_start - 1):
            raise RuntimeError("bt: cannot narrow Unicorn's instruction counter (popek.machine.engine)")
        m.set_reg("eip", eip)

    def _map_for_paging(self) -> None:
        """Map the cache into the monitor's page table (shadow.pt), which the shadow page directory puts in
        every guest address space: a guest that pages still reaches its translations. Only the part of the
        cache inside the 4 MiB around monitor memory can be mapped; the cache is sized to fit by default."""
        cache, shadow, memory = self.cache, self.shadow, self.m.memory
        start = memory.monitor_base & ~0x3FFFFF
        entries = b"".join(struct.pack("<I", page | 0x1 | 0x4 | 0x20)       # present, user, accessed
                           for page in range(cache.base, min(cache.end, start + 0x400000), PAGE))
        memory.monitor_write(shadow.pt + ((cache.base - start) >> 12) * 4, entries)
        self._pageable = cache.end <= start + 0x400000

    def state(self, machine: Machine) -> dict:
        s = super().state(machine)
        base = self._cs_base()
        if self.cache.contains((s["eip"] + base) & 0xFFFFFFFF):
            s["eip"] = self._guest_of((s["eip"] + base) & 0xFFFFFFFF)
        if self.paranoid:
            self._check_invisible()
        return s

    def detach(self, machine: Machine) -> None:
        ev = machine.events
        units, glue = self.cache.used()
        ev.count("translation", "runs", self.translator.runs)
        ev.count("translation", "units", self.translator.units)
        ev.count("translation", "instructions", self.translator.instructions)
        ev.count("translation", "cache-bytes", units)
        ev.count("translation", "glue-bytes", glue)
        for name, n in self.callouts.items():
            ev.count("callout", name, n)
        for (kind, name), n in self.counts.items():
            ev.count(kind, name, n)
        super().detach(machine)

    # --- the virtual CPU follows the guest ----------------------------------------------------------------
    def followed(self, what: str) -> None:
        """After the shadow structures followed the vcpu: translations made for another address space or other
        descriptors are stale."""
        if what in PAGING_CHANGES:
            paged, self._paging = self._paging, bool(self.vcpu.cr0 & CR0_PG)
            if self._paging and not self._pageable:
                self.m.triple_fault(f"bt: a {self.cache_size:#x}-byte cache does not fit the 4 MiB the monitor "
                                    "maps into a paging guest's address space")
                return
            if paged or self._paging:
                self._flush_wanted = "address-space"    # linear addresses may mean other bytes now
        if what in TABLE_CHANGES:
            self._accessed_known.clear()

    def _cs_base(self) -> int:
        return self.m.engine.segment_base("cs")

    def _key(self) -> tuple[int, int, bool]:
        """(virtual CPL, CS base, 32-bit code): what a translation depends on besides the guest bytes. (CS as
        loaded: the CPU keeps a segment when its descriptor changes.)"""
        cs = self.m.engine.segment("cs")
        return self.vcpu.cpl, cs.base, cs.big

    # --- finding translations -----------------------------------------------------------------------------
    def _find(self, eip: int, key: tuple) -> int:
        """The cache address of guest ``eip`` (linear) under ``key``, translating on a miss. Raises
        GuestFault when the code cannot be fetched."""
        cache = self.cache
        found = cache.index.get((eip, key))
        if found is not None:
            self.counts["lookup", "hit"] += 1
            return found
        self.counts["lookup", "miss"] += 1
        try:
            run, found = self.translator.translate(eip, key)
        except CacheFull:
            self._flush("cache-full")
            run, found = self.translator.translate(eip, key)
        self.guard.watch(run.units)
        return found

    def _flush(self, why: str) -> None:
        self.cache.flush()
        self.counts["flush", why] += 1
        self.guard.unwatch()

    def _goto(self, eip: int, callout: bool) -> None:
        """Continue the guest at guest ``eip`` (CS-relative), in its translation. ``callout``: called from the
        syscall hook, which adds 2 to EIP afterwards."""
        m = self.m
        if m.end is not None:
            return
        if self._flush_wanted is not None:
            self._flush(self._flush_wanted)
            self._flush_wanted = None
        key = self._key()
        linear = (eip + key[1]) & 0xFFFFFFFF
        if self.direct_user and key[0] == 3:
            m.set_reg("eip", (eip - 2) & 0xFFFFFFFF if callout else eip)
            return
        try:
            found = self._find(linear, key)
        except GuestFault as fault:         # the target cannot be fetched: the guest's fault, at the target
            self._fault_at_target(eip, fault, callout)
            return
        except Untranslatable as exc:
            m.triple_fault(f"bt: {exc} at {eip:#x} is not translated")
            return
        self._base = key[1]
        real = (found - key[1]) & 0xFFFFFFFF
        m.engine.write(EIP, (real - 2) & 0xFFFFFFFF if callout else real)

    def _deliver(self, event: Interrupt, callout: bool) -> None:
        """Deliver ``event`` through the guest's virtual IDT and continue in the handler's translation."""
        cpl = self.vcpu.cpl
        self.reflect(self.m, event)
        if self.m.end is not None:              # a triple fault: EIP stays where the guest faulted, as natively
            self.m.set_reg("eip", (event.eip - 2) & 0xFFFFFFFF if callout else event.eip)   # (see _goto)
            return
        self._accessed(("cs", "ss") if self.vcpu.cpl != cpl else ("cs",))
        if self.paranoid:
            self._check_invisible()
        self._goto(self.m.reg("eip"), callout)

    def _accessed(self, sregs: tuple[str, ...]) -> None:
        """Set the accessed bit of the guest's descriptors just loaded into ``sregs``, where a native run
        sets it: QEMU's segment loads (mov, pop, lss...) and the machine's interrupt delivery write it into
        the guest's table; QEMU's far jmp/call/ret and iret do not. Here the real loads read the shadow GDT,
        where the bit is preset, so without this the guest's own table would keep it clear."""
        m, v = self.m, self.vcpu
        for selector in m.registers(sregs).values():
            if selector & 0xFFFC == 0:
                continue
            base, limit = (v.ldtr.base, v.ldtr.limit) if selector & 4 else v.gdtr
            known = (selector & 0xFFFC, base)
            if known in self._accessed_known:
                continue
            self._accessed_known.add(known)
            at = base + (selector & 0xFFF8) + 4
            if (selector & 0xFFF8) + 7 > limit:
                continue
            try:
                space = v.space(m)
                (high,) = struct.unpack("<I", space.read(at, 4))
                if high & CODE_OR_DATA and not high & ACCESSED_BIT:
                    space.write(at, struct.pack("<I", high | ACCESSED_BIT))
            except GuestFault:
                pass

    def _guest_of(self, address: int) -> int:
        guest = self.cache.guest_address(address)
        if guest is None:
            raise AssertionError(f"bt: EIP {address:#x} in the cache maps to no guest instruction")
        return (guest - self._cs_base()) & 0xFFFFFFFF

    # --- callouts -----------------------------------------------------------------------------------------
    def _on_syscall(self) -> None:
        m = self.m
        eip = self._eip.value if self._eip is not None else m.engine.read(EIP)
        at = (eip + self._base) & 0xFFFFFFFF                    # EIP is CS-relative; sites are linear
        site = self.cache.sites.get(at)
        if site is None:
            return                          # a guest syscall copied unchanged: a no-op, as natively
        if self.paranoid:
            self._check_invisible()
        kind = site.kind
        if kind == "emulate":
            self._emulate(site, False)
        elif kind == "emulate-last":
            self._emulate(site, True)
        elif kind == "exit":
            self._exit(site)
        elif kind == "lookup":
            self._lookup(site)
        elif kind == "fip":
            self._guest_fip()
        elif kind == "near-branch":
            self.callouts["near-branch"] += 1
            try:
                eip = near.execute(m, self.vcpu, site.recipe, (site.guest - self._base) & 0xFFFFFFFF)
            except GuestFault as fault:
                self._fault_at(site, fault)
                return
            self._goto(eip, callout=True)

    def _guest_fip(self) -> None:
        """Before a store of the x87 state (bt_translate.FIP_STORES): FIP, the EIP of the last x87
        instruction, is where it ran in the cache; make it the guest's. (A FIP the guest loaded itself, with
        fldenv or frstor, is not in the cache and stays.)"""
        self.callouts["fip"] += 1
        engine = self.m.engine
        guest = self.cache.guest_address((engine.read(FIP) + self._base) & 0xFFFFFFFF)
        if guest is not None:
            engine.write(FIP, (guest - self._cs_base()) & 0xFFFFFFFF)

    def _uncount(self) -> None:
        """The callout just counted is not a guest instruction (``continue``, ``poison``)."""
        self.m.instructions -= 1
        self.m.time -= 1

    def _emulate(self, site, last: bool) -> None:
        """Run the routine; continue in the cache after the callout unless it transferred control (or the
        callout closes its run: ``last``). The hot path reads no register of its own: only routines that
        transfer control can change CS or the CPL."""
        m, v = self.m, self.vcpu
        recipe = site.recipe
        name = recipe.name
        self.callouts[name] += 1
        if name not in TRANSFERS:
            try:
                eip = site.routine(m, v, recipe)
            except GuestFault as fault:
                self._fault_at(site, fault)
                return
            if name in DATA_LOADS:
                self._accessed((recipe.operands[0].reg,))
            elif name in SETS_TF:
                self._stepping_from_next()
            if last or self._flush_wanted is not None or eip != (site.next - site.owner.key[1]) & 0xFFFFFFFF:
                self._goto(eip, callout=True)
            return
        cpl, entry = v.cpl, v.entry
        try:
            eip = site.routine(m, v, recipe)
        except GuestFault as fault:
            self._fault_at(site, fault)
            return
        if v.entry is not entry:                # delivered through the IDT (int n, int3, into with OF)
            self._accessed(("cs", "ss") if v.cpl != cpl else ("cs",))
        elif name in SETS_TF:
            self._stepping_from_next()
        # Always through the monitor: the new EIP may even be the next instruction's (an interrupt handler
        # right after its int n), but at another CPL or in another code segment, so in another translation.
        self._goto(eip, callout=True)

    # --- single-stepping (the guest's EFLAGS.TF, kept virtual: SteppingVCpu) ------------------------------
    def next_event(self, machine: Machine) -> int | None:
        """With the guest's TF set at an instruction's start, chunks of one instruction: the single-step trap
        comes after it (as on the CPU, and as Unicorn decides it: TF at the instruction's start counts)."""
        event = super().next_event(machine)
        if not getattr(self.vcpu, "stepping", False):
            self._step = None
            return event
        self._step = (machine.instructions, self.vcpu.entry, self._guest_here())
        return machine.time + 1 if event is None else min(event, machine.time + 1)

    def _finished_rep(self, guest: int) -> int:
        """The length of the rep-prefixed string instruction at guest ``guest`` when its count register
        (ECX, or CX with 0x67) is 0, else 0."""
        m, v = self.m, self.vcpu
        linear = (guest + self._cs_base()) & 0xFFFFFFFF
        for length in (15, 0x1000 - linear % 0x1000):      # (fewer bytes before a page it cannot read)
            try:
                raw = v.space(m).read(linear, min(length, 15))
                break
            except GuestFault:
                continue
        else:
            return 0
        at = 0
        while at < len(raw) - 1 and raw[at] in LEGACY_PREFIXES:
            at += 1
        if raw[at] not in STRING_OPS or not {0xF2, 0xF3} & set(raw[:at]):
            return 0
        count = m.reg("ecx") & (0xFFFF if 0x67 in raw[:at] else 0xFFFFFFFF)
        return 0 if count else at + 1

    def _stepping_from_next(self) -> None:
        """A routine set TF: end the chunk before the next instruction, the first that is single-stepped."""
        if getattr(self.vcpu, "stepping", False):
            self.m.stop_chunk(finish=True)

    def advance(self, machine: Machine) -> int:
        step, self._step = self._step, None
        if step is not None and machine.end is None and not machine.halted \
                and machine.instructions == step[0] + 1 and self.vcpu.entry is step[1]:
            # (before the timer's interrupt: a trap of the previous instruction comes first, SDM Vol. 3A 6.9)
            self._single_step_trap(step[2])
        return super().advance(machine)

    def _guest_here(self) -> int | None:
        """The guest address (CS-relative) of the instruction the cache's EIP stands for, or None."""
        base = self._cs_base()
        guest = self.cache.guest_address((self.m.reg("eip") + base) & 0xFFFFFFFF)
        return None if guest is None else (guest - base) & 0xFFFFFFFF

    def _single_step_trap(self, started_at: int | None) -> None:
        """The instruction at guest ``started_at`` completed without an event: #DB (a trap) with the next
        instruction in its frame and DR6.BS set. A rep string instruction traps after each iteration, and
        after its last one the frame holds the next instruction: Unicorn, without TF in the real flags, goes
        back to the rep once more to find its count 0 (counted); the CPU, and Unicorn with TF, does not."""
        guest = self._guest_of((self.m.reg("eip") + self._cs_base()) & 0xFFFFFFFF)
        if guest == started_at:
            guest = (guest + self._finished_rep(guest)) & 0xFFFFFFFF
        self._deliver_step_trap(guest, callout=False)

    def _deliver_step_trap(self, guest: int, callout: bool) -> None:
        self.vcpu.dr[6] |= DR6_BS
        self._deliver(Interrupt(DB, EXCEPTION, None, eip=guest, insn=guest, why="single step"), callout)

    def _fault_at(self, site, fault: GuestFault) -> None:
        self._deliver(fault.event((site.guest - self._cs_base()) & 0xFFFFFFFF), True)

    def _exit(self, site) -> None:
        """A direct branch reached its stub: translate the target and link the branch to it."""
        self.callouts["exit"] += 1
        exit = site.exit
        key = exit.owner.key
        base = key[1]
        try:
            found = self._find(exit.target, key)
        except GuestFault as fault:
            self._fault_at_target(exit.target - base, fault)
            return
        except Untranslatable as exc:
            self.m.triple_fault(f"bt: {exc}")
            return
        target = self.cache.unit_at(found)
        if exit.owner.alive and target is not None and target.alive and site is self.cache.sites.get(exit.stub):
            if self.cache.link(exit, target, found):
                self.counts["chain", "patched"] += 1
            else:
                self.counts["lookup", "filled"] += 1
        self.m.engine.write(EIP, (found - base - 2) & 0xFFFFFFFF)

    def _fault_at_target(self, eip: int, fault: GuestFault, callout: bool = True) -> None:
        """The next instruction, at ``eip``, cannot be fetched. After a single-stepped instruction that
        completed, its trap comes first (SDM Vol. 3A 6.9: a trap of the previous instruction before a fault
        fetching the next); the fault follows when the handler returns there."""
        eip &= 0xFFFFFFFF
        step = self._step
        if step is not None and self.vcpu.entry is step[1]:
            self._step = None
            self._deliver_step_trap(eip, callout)
            return
        self._deliver(fault.event(eip), callout)

    def _lookup(self, site) -> None:
        """An inline lookup missed: carry out the return or indirect branch, then add its target."""
        self.callouts["lookup"] += 1
        m, v = self.m, self.vcpu
        lookup = site.lookup
        layout = lookup.layout
        space = v.space(m)
        (target,) = peek(m, v, space, 1, 4)        # the glue left the target on top of the stack
        esp = m.reg("esp")
        if layout.kind == "ret":
            m.set_reg("esp", (esp + 4 + layout.release) & 0xFFFFFFFF)
        elif layout.kind == "jmp":
            m.set_reg("esp", (esp + 4) & 0xFFFFFFFF)
        else:                                       # call: the return address replaces the target
            m.set_reg("esp", (esp + 4) & 0xFFFFFFFF)
            push(m, v, space, [layout.ret_to], 4)
        key = lookup.owner.key
        linear = (target + key[1]) & 0xFFFFFFFF
        try:
            found = self._find(linear, key)
        except GuestFault as fault:
            self._fault_at_target(target, fault)
            return
        except Untranslatable as exc:
            m.triple_fault(f"bt: {exc}")
            return
        unit = self.cache.unit_at(found)
        if lookup.owner.alive and unit is not None and unit.alive and site is self.cache.sites.get(
                lookup.at + layout.callout_at):
            self.cache.fill(lookup, target, unit, found)     # the glue compares EIPs
            self.counts["lookup", "filled"] += 1
        m.engine.write(EIP, (found - key[1] - 2) & 0xFFFFFFFF)

    # --- events from the machine --------------------------------------------------------------------------
    def intercept(self, machine: Machine, event: Interrupt) -> bool:
        cache = self.cache
        self.guard.settle()
        if event is RESYNC:
            base = self._cs_base()
            linear = (machine.reg("eip") + base) & 0xFFFFFFFF
            unit = cache.unit_at(linear)
            if unit is not None and not unit.alive:
                self._goto(self._guest_of(linear), callout=False)
            return True
        base = self._cs_base()
        linear = (event.eip + base) & 0xFFFFFFFF            # Unicorn reports EIP, CS-relative
        if event.source == SOFTWARE and event.vector == BP and cache.contains(linear - 1):
            unit = cache.unit_at(linear - 1)
            if unit is not None and not unit.alive and (linear - 1) in cache.guest_of:
                # An instruction start of an invalidated unit: translate again from its guest address.
                self.callouts["poison"] += 1
                self._uncount()
                self._goto(self._guest_of(linear - 1), callout=False)
                return True
        if event.source == SOFTWARE and event.vector == emit.CONTINUE_VECTOR:
            site = cache.sites.get(linear)
            if site is not None and site.kind == "continue":
                self.callouts["continue"] += 1
                self._uncount()
                self._goto((site.next - base) & 0xFFFFFFFF, callout=False)
                return True
        if cache.contains(linear):
            address = linear - 1 if event.source == SOFTWARE and event.vector == BP else linear
            guest = self._guest_of(address)
            event.eip = event.insn = guest
            if event.source == SOFTWARE:        # int3 copied unchanged: the frame holds the next instruction
                event.eip = guest + 1
            if event.source == EXCEPTION and event.vector == GP and self.vcpu.cpl == 0:
                name = self._unemulated_privileged(guest)
                if name is not None:            # the #GP is the deprivileging's (the real ring), not the
                    # guest's: say so rather than deliver what the guest would not get
                    machine.finish(UNSUPPORTED, None, f"bt: {name} at the guest's ring 0 is not modelled "
                                                      "(a privileged instruction with no emulation routine)")
                    return True
        if event.vector == PF and event.source == EXCEPTION:
            if self.hidden_page_fault(machine, event):
                return True
            event.address = machine.reg("cr2")
        self._deliver(event, callout=False)
        return True

    def _unemulated_privileged(self, guest: int) -> str | None:
        """The name of the instruction at ``guest`` if the ISA says it is privileged and no routine emulates
        it (sysexit, ...): copied into the cache, it faults at the deprivileged ring where the guest's ring 0
        would run it."""
        base = self._cs_base()
        try:
            code = self.vcpu.space(self.m, mark=False).read((guest + base) & 0xFFFFFFFF, 15)
        except GuestFault:
            return None
        insn = decode_at(code, 0, guest, 32)
        if insn is None:
            return None
        entry = self.translator.classifier.lookup(code, 0, 32, insn.mnemonic, insn.op_str)
        if entry is None or entry.privileged != "yes" or entry.name in ROUTINES:
            return None
        return entry.name

    # --- tests: what the monitor writes where the guest can see it holds no cache address ------------------
    def _check_invisible(self) -> None:
        """``paranoid``: the words on top of the guest's stack (where calls, returns and interrupt frames put
        addresses) are no cache instruction or glue address. Registers are not checked: a guest may compute
        any number (descriptors.s shifts 0x0023 into 0x02300000 while printing it); the monitor itself only
        ever loads EIP with a cache address."""
        m, cache = self.m, self.cache
        try:
            stack = self.vcpu.space(m, mark=False).read(m.reg("esp"), 32)
        except GuestFault:
            return
        for i, (value,) in enumerate(struct.iter_unpack("<I", stack)):
            if cache.contains(value) and (value in cache.guest_of or value in cache.sites
                                          or cache.guest_address(value) is not None):
                raise AssertionError(f"bt: guest stack [esp+{4 * i}] holds cache address {value:#x}")

    def translation_map(self) -> dict[int, str]:
        """How each guest instruction in the cache now was translated, by linear guest address: ``ident``
        (copied unchanged), ``rewritten`` (a branch or a return sent through exits and lookups) or ``callout
        NAME`` (the instruction became a call into its emulation routine). For ``popek report``; a flush
        forgets the translations, so read it before one (and at the end of the run)."""
        cache, marks = self.cache, {}
        rank = {"ident": 0, "rewritten": 1}
        for unit in cache.units:
            if not unit.alive:
                continue
            ends = [at for at, _ in unit.insns[1:]] + [unit.cache_end]
            for (at, guest), end in zip(unit.insns, ends):
                code = cache.read(at, end - at) if end > at else b""
                try:
                    same = bool(code) and self.m.memory.read(guest, len(code)) == code
                except Exception:                   # outside RAM (paging): it was translated, not copied
                    same = False
                mark = "ident" if same else "rewritten"
                if rank.get(marks.get(guest), -1) < rank[mark]:
                    marks.setdefault(guest, mark)
                    if marks[guest] != mark and not marks[guest].startswith("callout"):
                        marks[guest] = mark
        for site in cache.sites.values():
            if site.kind in ("emulate", "emulate-last") and site.recipe is not None:
                marks[site.guest] = f"callout {site.recipe.name}"
            elif site.kind in ("exit", "lookup") and not marks.get(site.guest, "").startswith("callout"):
                marks[site.guest] = "rewritten"
        return marks

    # exposed for tests and the benchmark
    def cache_address(self, guest: int) -> int | None:
        return self.cache.index.get((guest, self._key()))


__all__ = ["BinaryTranslation"]
