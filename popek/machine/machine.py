"""The bare machine: one Unicorn x86-32 CPU, guest RAM, monitor memory, devices, and exception delivery.

``Machine`` owns the ``Uc`` and registers every hook here, in ``_install_hooks``. It runs the guest in
chunks (``execute(count)``, always with ``count > 0``: alternating with ``count = 0`` would flush Unicorn's
translation cache, and the count is what makes instruction counting exact). The run loop that decides chunk
sizes, timer interrupts, hlt and the budget is ``popek.monitors.base.Run``, written once for every monitor.

Guest faults become guest events, never Python exceptions: Unicorn's exceptions (``UC_HOOK_INTR``), memory
errors outside RAM (#GP(0)), invalid opcodes (#UD), denied port I/O (#GP(0)) and UMIP all become an
``Interrupt`` that goes first to the monitor (``ops.intercept``) and then through the guest's IDT
(``popek.machine.interrupts``). A bug in the machine or a monitor is a Python exception and propagates:
the binding stores an exception raised in a hook, stops emulation and re-raises it from ``emu_start``.

Instruction counting: ``guest_instructions`` is the sum of Unicorn's per-chunk counts. An instruction that
faults counts once per attempt, a ``rep`` string instruction once per iteration plus the final check; an
instruction fetch that fails before decoding does not count.

How a privilege change is done (Unicorn takes CPL from SS and refuses, through its API, to load a more
privileged SS): the exception frame is written to the new stack by the machine, then ``Engine.settle``
saves the CPU context, sets the CPL field and clears ``old_exception`` in it and restores it, after which
the API accepts the ring-0 (or ring-1/2) SS and CS. Loading SS sets the CPL again from its descriptor, so
Unicorn's state stays consistent. ``iret`` back to the outer ring is Unicorn's own.
"""
from __future__ import annotations

import struct
from typing import Any, Callable

import unicorn
from unicorn import x86_const as X

from popek.decode import decode_at
from popek.events import IO, VIRTUAL_IO
from popek.machine import cpuid, fastcall, interrupts, ioperm, quirks, xsave
from popek.machine.descriptors import ACCESSED, BOOT_CS, BOOT_DS, BOOT_GDT, Descriptor, tss_stack_offsets
from popek.machine.devices import PIC, PIT, ExitPort, PortBus, Serial
from popek.machine.engine import Engine, EngineError
from popek.machine.faults import BP, DB, ERROR_CODE, EXCEPTION, GP, OF, PF, SOFTWARE, TS, UD, GuestFault, \
    NotModelled, Interrupt
from popek.machine.guest import Guest
from popek.machine.memory import PAGE, RAM_DEFAULT, AddressSpace, Memory
from popek.machine.selfmod import SelfModifyingStores
from popek.machine.result import EXIT_PORT, INTERRUPTED, TRIPLE_FAULT, UNSUPPORTED, Events, Exit

BOOT_ESP = 0x00090000
BOOT_EFLAGS = 0x2
BOOT_CR0 = 0x11                 # PE | ET
IF_FLAG, IOPL_SHIFT = 1 << 9, 12

REG = {
    "eax": X.UC_X86_REG_EAX, "ebx": X.UC_X86_REG_EBX, "ecx": X.UC_X86_REG_ECX, "edx": X.UC_X86_REG_EDX,
    "esi": X.UC_X86_REG_ESI, "edi": X.UC_X86_REG_EDI, "esp": X.UC_X86_REG_ESP, "ebp": X.UC_X86_REG_EBP,
    "eip": X.UC_X86_REG_EIP, "eflags": X.UC_X86_REG_EFLAGS,
    "cs": X.UC_X86_REG_CS, "ds": X.UC_X86_REG_DS, "es": X.UC_X86_REG_ES, "fs": X.UC_X86_REG_FS,
    "gs": X.UC_X86_REG_GS, "ss": X.UC_X86_REG_SS,
    "cr0": X.UC_X86_REG_CR0, "cr2": X.UC_X86_REG_CR2, "cr3": X.UC_X86_REG_CR3, "cr4": X.UC_X86_REG_CR4,
}
_IDS: dict[tuple[str, ...], tuple[int, ...]] = {}
SEG_MASKED = frozenset({"cs", "ds", "es", "fs", "gs", "ss"})
_CONTROL = (X.UC_X86_REG_CR0, X.UC_X86_REG_CR3, X.UC_X86_REG_CR4)
TABLE_REG = {"gdtr": X.UC_X86_REG_GDTR, "idtr": X.UC_X86_REG_IDTR, "ldtr": X.UC_X86_REG_LDTR,
             "tr": X.UC_X86_REG_TR}

# Unicorn errors that are the guest's doing: an access outside RAM or into monitor memory, a bad opcode.
_MEMORY_ERRORS = {
    unicorn.UC_ERR_READ_UNMAPPED: "read", unicorn.UC_ERR_WRITE_UNMAPPED: "write",
    unicorn.UC_ERR_FETCH_UNMAPPED: "fetch", unicorn.UC_ERR_READ_PROT: "read",
    unicorn.UC_ERR_WRITE_PROT: "write", unicorn.UC_ERR_FETCH_PROT: "fetch",
}

_BAD_ACCESS_ERRORS = {"read": unicorn.UC_ERR_READ_UNMAPPED, "write": unicorn.UC_ERR_WRITE_UNMAPPED,
                      "fetch": unicorn.UC_ERR_FETCH_UNMAPPED}
HLT_OPCODE = 0xF4

# Why a chunk ended (Machine.execute).
COUNT, HLT, STOPPED, END = "count", "hlt", "stopped", "end"


class Machine:
    """One bare x86-32 machine in the boot state of DESIGN §3.3, with a guest loaded by ``load``."""

    def __init__(self, ram_size: int = RAM_DEFAULT, umip: bool = False):
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
        # No `until` address: with exits enabled and none listed, only the count, hooks and hlt end a chunk.
        # (An unreachable `until` is not enough: with paging on, Unicorn translates until-1 through the
        # guest's page tables when emu_start returns and leaves CR2 = until-1 when that fails. Measured.)
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        self.engine = Engine(self.uc)
        self.memory = Memory(self.uc, ram_size)
        self.events = Events()
        self.serial = Serial()
        self.pic = PIC()
        self.pit = PIT(self.now)
        self.ports = PortBus([self.serial, ExitPort(self._exit_port), self.pic, self.pit])
        self.ops: Any = None                 # the monitor's ops (popek.monitors.base.MonitorOps), set by run()
        self.guest: Guest | None = None
        self.umip = umip
        self.instructions = 0                # guest instructions counted in finished chunks
        self.time = 0                        # PIT clocks: instructions plus clocks skipped while halted
        self.halted = False
        self.devices_changed = False         # a write to the PIC or PIT in the last chunk
        self.end: Exit | None = None
        self._running = False
        self._stop_at: int | None = None     # counter value when a hook stopped the chunk
        self._pending: Interrupt | None = None
        self._saved: dict[str, int] = {}     # registers to put back before raising _pending
        self._last_access: tuple[str, int] | None = None
        # (EIP, counter) at the first bad access of a chunk, and the CPU state then (_on_bad_access)
        self._bad_access_at: tuple[int, int] | None = None
        self._bad_access_state = None
        self.cpu = interrupts.RealCpu()      # what the guest's IDT delivers to when no monitor takes an event
        self.raised = 0                      # events raised so far (to tell whether an instruction faulted)
        self._uncounted = 0                  # attempts counted in this chunk that were the monitor's (uncount)
        self.guards: dict[int, quirks.Quirk] = {}    # Unicorn exits where the machine corrects Unicorn
        self._probes: dict[int, int] = {}    # guard -> code hook on the byte before it (a hlt there?)
        self._probed: int | None = None      # the probed address that began an instruction in this chunk
        self._fixup = None                   # (error) -> None: corrects the one-instruction chunk just run
        self.stop_requested = False          # Ctrl-C: end the run with reason `interrupted` (request_stop)
        self._boot()
        self._install_hooks()

    # --- setup ------------------------------------------------------------------------------------------
    def _boot(self) -> None:
        gdt = self.memory.alloc(len(BOOT_GDT), 8)
        self.memory.monitor_write(gdt, BOOT_GDT)
        self.uc.reg_write(X.UC_X86_REG_GDTR, (0, gdt, len(BOOT_GDT) - 1, 0))
        self.uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, 0, 0))      # no IDT: limit 0, every vector faults
        e = self.engine
        e.write(X.UC_X86_REG_CR0, BOOT_CR0)
        e.write(X.UC_X86_REG_CR4, 1 << 11 if self.umip else 0)  # reset value, plus UMIP when modelled
        e.write(X.UC_X86_REG_CS, BOOT_CS)
        for seg in ("ds", "es", "fs", "gs", "ss"):
            e.write(REG[seg], BOOT_DS)
        e.write(X.UC_X86_REG_ESP, BOOT_ESP)
        e.write(X.UC_X86_REG_EFLAGS, BOOT_EFLAGS)

    def _install_hooks(self) -> None:
        """Every hook of the machine, in one place. INTR and port I/O hooks have no address range;
        memory and block hooks cover the whole 32-bit space because with paging any linear address can
        reach outside RAM or hold code. (With UMIP, the detector adds one code hook per affected
        instruction address as it finds them: see popek.machine.umip.)"""
        uc = self.uc
        uc.hook_add(unicorn.UC_HOOK_INTR, self._on_intr)
        uc.hook_add(unicorn.UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(unicorn.UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(unicorn.UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        uc.hook_add(unicorn.UC_HOOK_MEM_INVALID, self._on_bad_access, None, 0, 0xFFFFFFFF)
        self.selfmod = SelfModifyingStores(self)        # exact counts for stores into running code
        if self.umip:
            from popek.machine.umip import Umip
            self.umip_detector = Umip(self)             # its block hook: popek.machine.watch

    def load(self, guest: Guest) -> None:
        guest.check_fits(self.memory.ram_size)
        self.guest = guest
        found: dict[int, quirks.Quirk] = {}
        for address, data in guest.segments:
            self.memory.write(address, data)
            found.update(quirks.scan(data, address))
        self.engine.write(X.UC_X86_REG_EIP, guest.entry)
        self.guard(found)

    def guard(self, found: dict[int, quirks.Quirk]) -> None:
        """Make ``found`` (address -> quirk, from ``quirks.scan``) Unicorn exits, so that the machine decides
        what the instructions there do before Unicorn translates them (``_guarded``)."""
        if not found:
            return
        self.guards.update(found)
        self.uc.ctl_set_exits(sorted(self.guards))
        for address in found:                   # a block translated before cannot know the new exit
            # (a probe is a Python call on every run of the instruction at the byte before: most guards are
            # bytes inside other instructions, often in a hot loop, so only where a hlt can begin there)
            if address not in self._probes and address > 0 and self._byte_before(address) == HLT_OPCODE:
                self._probes[address] = self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_probe, None,
                                                         address - 1, address - 1)
            self._retranslate(address)

    def _drop_guard(self, address: int) -> None:
        del self.guards[address]
        probe = self._probes.pop(address, None)
        if probe is not None:
            self.uc.hook_del(probe)
        self.uc.ctl_set_exits(sorted(self.guards))
        self._retranslate(address)

    def _retranslate(self, linear: int) -> None:
        """Drop Unicorn's translations of the block that ends at ``linear`` and of one that begins there, so
        that an exit added or removed there takes effect (Unicorn checks exits as it translates: a block
        keeps the stop it was made with). Unicorn finds the code through the guest's page tables from the
        first byte; where that walk fails, the #PF is never delivered but leaves CR2 and old_exception set,
        and the guest's next #PF then arrived as #DF (measured): both are put back."""
        cr2 = self.reg("cr2")
        self.uc.ctl_remove_cache(linear - 1 if linear else 0, linear + 1)
        if self.reg("cr2") != cr2:
            self.set_reg("cr2", cr2)
            self.engine.settle()

    def _on_probe(self, uc, address: int, size: int, _) -> None:
        # Unicorn stops on hlt and before an exit alike (it implements exits as an imitated hlt), so a stop
        # at a guard right after a one-byte hlt is ambiguous; an instruction that began at the byte before
        # the guard, and is a hlt, tells them apart (execute).
        self._probed = address

    # --- registers --------------------------------------------------------------------------------------
    def reg(self, name: str) -> int:
        value = self.engine.read(REG[name])
        return value & 0xFFFF if name in SEG_MASKED else value & 0xFFFFFFFF

    def set_reg(self, name: str, value: int) -> None:
        self.engine.write(REG[name], value)

    def registers(self, names: tuple[str, ...] = ("eflags", "cs", "ss", "esp")) -> dict[str, int]:
        """Several registers in one batch call."""
        ids = _IDS.get(names)
        if ids is None:
            ids = _IDS[names] = tuple(REG[n] for n in names)
        values = self.engine.read_many(ids)
        return {n: v & (0xFFFF if n in SEG_MASKED else 0xFFFFFFFF) for n, v in zip(names, values)}

    def cpl(self) -> int:
        return self.reg("cs") & 3

    def interrupts_enabled(self) -> bool:
        return bool(self.reg("eflags") & IF_FLAG)

    def table(self, name: str) -> tuple[int, int, int]:
        """(selector, base, limit) of gdtr, idtr, ldtr or tr as Unicorn holds them."""
        return self.engine.read_table(TABLE_REG[name])

    def idtr(self) -> tuple[int, int]:
        return self.table("idtr")[1:]

    def set_table(self, name: str, base: int, limit: int, selector: int = 0, flags: int = 0) -> None:
        """Point GDTR/IDTR (base, limit) at a table, e.g. a monitor's shadow table in monitor memory. For
        LDTR and TR this sets the descriptor cache directly, as a monitor that owns the real tables may;
        ``flags`` are the cache's attribute bits as in the descriptor's high dword (present, DPL, type).
        TR needs them: Unicorn reads the ring-n stack from the TSS on a call through a call gate to an inner
        ring and aborts the whole process ("invalid tss") unless the cached TR is present with the type ltr
        caches (9, an available 32-bit TSS: the busy bit is set in memory only). Measured."""
        self.uc.reg_write(TABLE_REG[name], (selector, base, limit, flags))

    def set_cr2(self, address: int) -> None:
        self.engine.write(X.UC_X86_REG_CR2, address)

    def state(self) -> dict:
        """The real CPU state in the shape of DESIGN §3.4 (a monitor reports its virtual one instead)."""
        s: dict[str, Any] = {name: self.reg(name) for name in
                             ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp", "eip", "eflags",
                              "cs", "ds", "es", "fs", "gs", "ss")}
        s["cpl"] = s["cs"] & 3
        for name in ("gdtr", "idtr"):
            _sel, base, limit = self.table(name)
            s[name] = {"base": base, "limit": limit & 0xFFFF}
        s["ldtr"], s["tr"] = self.table("ldtr")[0] & 0xFFFF, self.table("tr")[0] & 0xFFFF
        for name in ("cr0", "cr2", "cr3", "cr4"):
            s[name] = self.reg(name)
        return s

    # --- guest memory through segments and paging ------------------------------------------------------
    def address_space(self) -> AddressSpace:
        """Paging and descriptor tables as they are now (read once: build one per delivery)."""
        cr0, cr3, cr4 = self.engine.read_many(_CONTROL)
        return AddressSpace(self.memory, cr0, cr3, cr4, self.table("gdtr")[1:], self.table("ldtr")[1:])

    def read_linear(self, linear: int, size: int) -> bytes:
        return self.address_space().read(linear, size)

    def descriptor(self, selector: int, vector: int = GP, error_code: int = 0) -> Descriptor:
        return self.address_space().descriptor(selector, vector, error_code)

    def tss_stack(self, space: AddressSpace, cpl: int, ext: int) -> tuple[int, int]:
        """(SS, ESP) for ring ``cpl`` from the current 32-bit TSS."""
        selector, base, limit = self.table("tr")
        esp_at, ss_at = tss_stack_offsets(cpl)
        if selector & 0xFFFC == 0 or limit < ss_at + 1:
            raise GuestFault(TS, (selector & 0xFFFC) + ext, f"no ring-{cpl} stack in TSS {selector:#x}")
        esp, ss = struct.unpack("<IH", space.read(base + esp_at, 6))
        return ss, esp

    def _mark_accessed(self, space: AddressSpace, selector: int) -> None:
        """Set a descriptor's accessed bit as the CPU would, before Unicorn's API loads it: Unicorn writes
        the bit itself from outside its emulation loop, which must never fault (monitor memory is
        read-only to Unicorn). Setting it is a write: through paging it sets the page's dirty bit, and faults
        on a read-only page under CR0.WP (why Linux presets the bits of a read-only GDT)."""
        physical = space.physical(space.descriptor_address(selector, GP, 0) + 4, 4, write=True)
        high = self.memory.u32(physical)
        if not high & ACCESSED:
            data = struct.pack("<I", high | ACCESSED)
            if self.memory.in_ram(physical, 4):
                self.memory.write(physical, data)
            else:
                self.memory.monitor_write(physical, data)

    def unaccessed_descriptors(self, space: AddressSpace, selectors) -> list[tuple[int, int]]:
        """(physical address, high dword) of the descriptors in RAM at ``selectors`` (None or null: skipped)
        whose accessed bit is clear, for ``restore_descriptors`` after a load that must not set it: Unicorn's
        API sets the bit when it loads a selector, but its far jmp/call/ret and iret do not (measured), and
        sysenter does not read the GDT at all."""
        kept = []
        for selector in selectors:
            if selector is None or selector & 0xFFFC == 0:
                continue
            at = space.physical(space.descriptor_address(selector, GP, 0) + 4, 4)
            high = self.memory.u32(at)
            if not high & ACCESSED and self.memory.in_ram(at, 4):
                kept.append((at, high))
        return kept

    def restore_descriptors(self, kept: list[tuple[int, int]]) -> None:
        for at, high in kept:
            self.memory.write(at, struct.pack("<I", high))

    def enter(self, cs: int, eip: int, eflags: int, esp: int, cpl: int, ss: int | None = None,
              space: AddressSpace | None = None) -> None:
        """Load CS:EIP, EFLAGS, ESP and, on a privilege change, SS at ``cpl``. Precondition: the selectors
        were checked (present, right type and DPL); the frame is already on the stack. Pass ``space`` when
        a descriptor may lack its accessed bit (None: the caller saw it set in both)."""
        e = self.engine
        if space is not None:
            self._mark_accessed(space, cs)
            if ss is not None:
                self._mark_accessed(space, ss)
        if ss is not None:
            e.settle(cpl)
            e.write(X.UC_X86_REG_SS, ss)
        e.write(X.UC_X86_REG_CS, cs)
        e.write(X.UC_X86_REG_ESP, esp)
        e.write(X.UC_X86_REG_EFLAGS, eflags)
        e.write(X.UC_X86_REG_EIP, eip)
        if ss is not None and self.cpl() != cpl:
            raise EngineError(f"privilege change to CPL {cpl} did not take (CS={self.reg('cs'):#x})")

    def enter_flat(self, cs: int, ss: int, cpl: int, eip: int, esp: int, eflags: int) -> None:
        """Load the flat CS and SS of sysenter/sysexit at ``cpl`` (popek.machine.fastcall) without reading a
        descriptor table, as the CPU does, and EIP, ESP and EFLAGS."""
        for name, cache in fastcall.flat_segments(cs, ss, cpl).items():
            self.engine.load_segment(name, cache)
        for reg, value in ((X.UC_X86_REG_ESP, esp), (X.UC_X86_REG_EFLAGS, eflags), (X.UC_X86_REG_EIP, eip)):
            self.engine.write(reg, value)

    # --- time and instruction counts --------------------------------------------------------------------
    def now(self) -> int:
        """Machine time in PIT clocks, exact also in the middle of a chunk (from a hook)."""
        return self.time + (self.engine.counter() - self._uncounted if self._running else 0)

    def total_instructions(self) -> int:
        return self.instructions + (self.engine.counter() - self._uncounted if self._running else 0)

    def uncount(self) -> None:
        """From a hook: the instruction attempt Unicorn just counted was the monitor's, not the guest's (a
        fault the monitor handled without the guest seeing it, e.g. a hidden page fault, after which the
        instruction runs again): take it off the guest's instruction count and the machine's clock, so that
        timer interrupts land where they land natively."""
        self._uncounted += 1

    def request_stop(self) -> None:
        """Ctrl-C (from a signal handler or another thread): end the run soon with reason ``interrupted``.
        Lowers the running chunk's count limit, so Unicorn stops before the next counted instruction, a
        guest instruction boundary under every monitor; the run loop then ends the run."""
        self.stop_requested = True
        if self._running:
            self.engine.stop_at_next()

    # --- running ----------------------------------------------------------------------------------------
    def execute(self, count: int) -> str:
        """Run at most ``count`` (>= 1) guest instructions. Returns COUNT (all ran), HLT (the CPU halted),
        STOPPED (a hook ended the chunk early: a device changed the schedule, or an event was delivered)
        or END (the run is over)."""
        assert count >= 1 and self.end is None
        self._stop_at, self._pending, self._saved, self._last_access = None, None, {}, None
        self._bad_access_at = None
        self._probed = None
        error = None
        count = self.selfmod.begin(count)
        self._running = True
        try:
            self.uc.emu_start(self.reg("eip"), 0, count=count)
        except unicorn.UcError as exc:
            error = exc
        except NotModelled as exc:                  # from a monitor's hook
            self.finish(UNSUPPORTED, None, f"{self.ops.name if self.ops else 'machine'}: {exc} is not modelled")
        finally:
            self._running = False
        if error is None and self._bad_access_at is not None:
            # (a helper's store ran on past a bad access and a stop from a hook then ended emu_start
            # without its error: hvm's block rescans did, and the store outside RAM went unnoticed)
            error = unicorn.UcError(_BAD_ACCESS_ERRORS[self._last_access[0]])
        counted = self.engine.counter()
        if error is None:
            self.selfmod.end(counted)
        if self._fixup is not None:             # before any event is delivered: its frame must see the fix
            fixup, self._fixup = self._fixup, None
            fixup(error)
        count += self.selfmod.extended
        # (a count limit lowered by request_stop stops Unicorn at limit + 1 counted, before that instruction)
        executed = self._stop_at if self._stop_at is not None else min(counted, count, self.engine.count_limit())
        executed = max(0, executed - self._uncounted)
        self._uncounted = 0
        self.instructions += executed
        self.time += executed
        if self.end is not None:
            return END
        if self.stop_requested:
            for name, value in self._saved.items():
                self.set_reg(name, value)
            self.finish(INTERRUPTED, None, "SIGINT")
            return END
        if self._pending is not None:
            for name, value in self._saved.items():
                self.set_reg(name, value)
            self.raise_interrupt(self._pending)
            return END if self.end is not None else STOPPED
        if error is not None:
            event = self._event_for(error)
            if event is not None:                   # (None: an instruction runs alone first)
                self.raise_interrupt(event)
            return END if self.end is not None else STOPPED
        if self._stop_at is not None:
            return STOPPED
        if counted > count:
            return COUNT
        # emu_start returned by itself before the count ran out: at a guard (an exit), or hlt.
        eip = self.reg("eip")
        linear = self.linear_pc(eip)
        hlt = self._byte_before(linear) == HLT_OPCODE
        if linear in self.guards and not (hlt and self._probed == linear - 1):
            return self._guarded(eip, linear) if counted < count else COUNT
        if hlt:
            self.halted = True
            return HLT
        raise EngineError(f"emulation stopped without a reason at {eip:#x}")

    def linear_pc(self, eip: int) -> int:
        """The linear address of CS:``eip``: Unicorn's exits and code hooks compare linear addresses. (The
        base is CS's as loaded, not as its descriptor may read now.)"""
        return (self.engine.segment("cs").base + eip) & 0xFFFFFFFF

    def _guarded(self, eip: int, linear: int) -> str:
        """Unicorn stopped before a guarded address (``guard``; CS:``eip``, ``linear``): do what the hardware
        does there."""
        code = self._code_at(linear)
        quirk = quirks.match(code, 0)
        if quirk is None:
            if not code and self.guards[linear] is not None:
                # (the page of a corrected instruction is not present: Unicorn raises that fetch's fault,
                # and the guard stays for when the guest maps the page and returns there)
                return self._step_alone(linear, lambda error: None)
            self._drop_guard(linear)            # the guest rewrote it, runs it through another mapping, or
            return STOPPED                      # it was a stop of _fetch_is_later's
        if quirk.action == quirks.UD:
            return self._fault_here(quirk, UD, eip, quirk.hardware)
        if quirk.action == quirks.XSETBV_CHECKS:
            checked = (self.cpl(), self.reg("cr4"), self.reg("ecx"), self.reg("edx") << 32 | self.reg("eax"))
            hardware = xsave.fault(*checked)
            if hardware is not None and hardware[0] != xsave.unicorn_fault(*checked):
                return self._fault_here(quirk, hardware[0], eip, hardware[1])
            return self._step_alone(linear, lambda error: None)
        if quirk.action == quirks.SYSENTER:
            return self._step_alone(linear, self._sysenter_fixup(eip, self.raised))
        if quirk.action == quirks.MACHINE_TSC:
            # (the clock as the instruction sees it, itself counted: as a PIT read by `in` sees it, and as
            # the rdtsc routine of bt and hvm's exit sees it)
            return self._step_alone(linear, self._tsc_fixup(self.now() + 1, self.raised))
        return self._step_alone(linear, self._zero_extend_fixup)

    def _fault_here(self, quirk: quirks.Quirk, vector: int, eip: int, why: str) -> str:
        """The fault the hardware raises at the guarded instruction CS:``eip``, where Unicorn does otherwise."""
        self.events.count("corrected", quirk.name)
        self.instructions += 1                  # counted once, like any instruction that faults
        self.time += 1
        self.raise_interrupt(Interrupt(vector, EXCEPTION, 0 if vector in ERROR_CODE else None, eip=eip, insn=eip,
                                       why=why))
        return END if self.end is not None else STOPPED

    def _zero_extend_fixup(self, error: unicorn.UcError | None) -> None:
        """After a ``ret imm16``/``retf imm16`` alone: put back the 0x10000 its sign-extended immediate took
        off ESP (quirks: ret-imm16-zero-extended). The return completed unless it faulted itself (a stack
        read, or an event from Unicorn such as retf's #GP); a fault fetching at the target comes after it,
        and its frame must hold the corrected ESP."""
        if not self._stepped(error):
            return
        if self.engine.segment("ss").big:
            self.set_reg("esp", (self.reg("esp") + 0x10000) & 0xFFFFFFFF)
        self.events.count("corrected", quirks.QUIRKS["ret-imm16-zero-extended"].name)

    def _tsc_fixup(self, clock: int, raised: int) -> Callable[[unicorn.UcError | None], None]:
        """After an ``rdtsc``/``rdtscp`` alone: EDX:EAX is the machine's clock at the instruction, not
        Unicorn's host-driven TSC (quirks: tsc-from-host-clock); its #GP under CR4.TSD is Unicorn's, and
        delivered from the hook (``raised`` then moved on): the handler's EAX is not touched."""
        def put_clock(error: unicorn.UcError | None) -> None:
            if self._stepped(error) and self.raised == raised:
                self.set_reg("eax", clock & 0xFFFFFFFF)
                self.set_reg("edx", (clock >> 32) & 0xFFFFFFFF)
                self.events.count("corrected", quirks.QUIRKS["tsc-from-host-clock"].name)
        return put_clock

    def _sysenter_fixup(self, insn: int, raised: int) -> Callable[[unicorn.UcError | None], None]:
        """After a ``sysenter`` alone, which Unicorn only stepped over: carry it out (quirks:
        sysenter-not-executed), unless a monitor's hook there delivered an event instead (``raised`` then
        moved on). In real mode Unicorn's #GP(0) is the hardware's."""
        def enter(error: unicorn.UcError | None) -> None:
            if not self._stepped(error) or self.raised != raised or not self.reg("cr0") & 1:
                return
            self.events.count("corrected", quirks.QUIRKS["sysenter-not-executed"].name)
            try:
                cs, ss, eip, esp = fastcall.sysenter(self.uc.msr_read)
            except GuestFault as fault:
                self.raise_interrupt(fault.event(insn))
                return
            self.enter_flat(cs, ss, 0, eip=eip, esp=esp, eflags=self.reg("eflags") & ~fastcall.SYSENTER_CLEARS)
        return enter

    def _stepped(self, error: unicorn.UcError | None) -> bool:
        """Whether the one instruction a fixup corrects completed (a fault fetching the next one aside); a
        monitor's hook may stop the chunk before it ran (hvm's exits), and it is then guarded again."""
        if self._pending is not None or self.end is not None or self.engine.counter() < 1:
            return False
        return error is None or _MEMORY_ERRORS.get(error.errno) == "fetch"

    def _step_alone(self, linear: int, fixup: Callable[[unicorn.UcError | None], None]) -> str:
        """Let Unicorn execute the guarded instruction at ``linear`` alone, then correct what it did
        (``fixup``, called before any event is delivered)."""
        exits = sorted(self.guards)
        self.uc.ctl_set_exits([a for a in exits if a != linear])
        self._retranslate(linear)
        self._fixup = fixup
        try:
            return self.execute(1)
        finally:
            self._fixup = None
            self.uc.ctl_set_exits(exits)
            self._retranslate(linear)

    def _code_at(self, linear: int) -> bytes:
        """Up to 15 bytes of code at ``linear``: fewer where the page after is not mapped (an instruction
        near the end of a page need not reach into the next), none where ``linear`` itself is not."""
        for length in (15, PAGE - linear % PAGE):
            try:
                return self.read_linear(linear, min(length, 15))
            except GuestFault:
                continue
        return b""

    def _byte_before(self, linear: int) -> int | None:
        try:
            return self.read_linear(linear - 1, 1)[0]
        except GuestFault:
            return None

    def _event_for(self, error: unicorn.UcError) -> Interrupt | None:
        eip = self.reg("eip")
        if error.errno == unicorn.UC_ERR_INSN_INVALID:
            length = quirks.software_int6(self._code_at(self.linear_pc(eip)))
            if length is not None:                  # Unicorn reports `int 6` as #UD (quirks.software_int6)
                self.events.count("corrected", "int6-software-interrupt")
                return Interrupt(6, SOFTWARE, None, eip=(eip + length) & 0xFFFFFFFF, insn=eip, why="int 6")
            return Interrupt(UD, EXCEPTION, None, eip=eip, insn=eip, why="invalid opcode")
        if error.errno in _MEMORY_ERRORS:
            kind, address = self._last_access or (_MEMORY_ERRORS[error.errno], eip)
            if kind == "fetch" and self._fetch_is_later(eip, address):     # (a fetch fails as Unicorn
                return None                                                 # translates: before the block ran)
            if kind != "fetch":                     # (a fetch fails before the instruction began)
                eip = self._rewind_to_bad_access(eip)
                self.settle_flags(eip, "fault")
            where = "monitor memory" if self.memory.readable(address, 1) else "outside memory"
            return Interrupt(GP, EXCEPTION, 0, eip=eip, insn=eip, why=f"{kind} at {address:#x} ({where})")
        raise error                                    # anything else is not the guest's doing

    def stop_chunk(self, pending: Interrupt | None = None, restore: dict[str, int] | None = None,
                   finish: bool = False) -> None:
        """From a hook: end the chunk after the current instruction (before it, from a code or block hook)
        and then raise ``pending``. Hooks must not redirect EIP themselves: except in UC_HOOK_INTR, Unicorn
        finishes the current translated block after an EIP write (measured).

        From a memory hook, Unicorn's stop abandons the instruction right after that access: the access is
        made, the rest of the instruction is not, and EIP stays at it (measured). ``finish=True`` lets the
        instruction complete and stops before the next counted one instead (``Engine.stop_at_next``).
        A pending event already set is not replaced by ``None``."""
        if self._stop_at is None:
            self._stop_at = self.engine.counter()
        if pending is not None:
            self._pending = pending
            self._saved = restore or {}
        if finish:
            self.engine.stop_at_next()
        else:
            self.uc.emu_stop()

    @property
    def event_pending(self) -> bool:
        """A hook already asked for an event at the end of this chunk (``stop_chunk(pending)``)."""
        return self._pending is not None

    def halt(self) -> None:
        """Halt the CPU until an interrupt (for a monitor emulating hlt): the run loop waits or ends."""
        self.halted = True
        if self._running:
            self.stop_chunk()

    def finish(self, reason: str, code: int | None = None, why: str = "") -> None:
        if self.end is None:
            self.end = Exit(reason, code, why)
        if self._running:
            self.stop_chunk()

    def triple_fault(self, why: str) -> None:
        self.events.count("exception", "triple-fault")
        self.finish(TRIPLE_FAULT, None, why)

    # --- events -----------------------------------------------------------------------------------------
    def raise_interrupt(self, event: Interrupt) -> None:
        """An event for the guest: the monitor sees it first; if it does not handle it, the guest's IDT does
        (``popek.machine.interrupts.deliver``, which also counts it)."""
        self.raised += 1
        if self.ops is not None and self.ops.intercept(self, event):
            self.cpu.entry = None
            return
        interrupts.deliver(self, self.cpu, event)

    def deliver(self, event: Interrupt) -> None:
        """Deliver through the guest's real IDT without asking the monitor (for a monitor reflecting an event
        to a guest that owns its IDT)."""
        interrupts.deliver(self, self.cpu, event)

    def _on_cpuid(self, uc, _) -> int:
        return cpuid.on_cpuid(self, uc, _)      # the bare machine's answer (popek.machine.cpuid)

    def _on_intr(self, uc, vector: int, _) -> None:
        # Clears old_exception too: Unicorn never does, which is the repeated-#GP bug.
        software, error_code = self.engine.take_exception()
        if self.end is not None:                # the run ended in this chunk (a monitor's finish): no more
            return
        if vector == DB and self._fixup is not None:
            # (the single-step trap after an instruction the machine corrects: the correction comes first,
            # so that the frame and the handler see it)
            fixup, self._fixup = self._fixup, None
            fixup(None)
        eip = self.reg("eip")
        if software:
            # Unicorn reports int n/int3/into with EIP after the instruction; a fault in delivering it
            # points at the instruction (CD ib, or the one-byte CC/CE).
            one_byte = vector in (BP, OF) and self._byte_before(self.linear_pc(eip)) in (0xCC, 0xCE)
            event = Interrupt(vector, SOFTWARE, None, eip=eip, insn=eip - (1 if one_byte else 2))
        else:
            # (#DB is single-step's trap after the instruction completed, with its flags committed)
            fetch = vector == PF and self.engine.fault_fetching_code()
            if fetch and self._fetch_is_later(eip, self.reg("cr2")):
                return                              # (Unicorn goes on from eip and stops at the guard)
            if vector != DB and not fetch:
                self.settle_flags(eip, "fault")
            event = Interrupt(vector, EXCEPTION, error_code if vector in ERROR_CODE else None, eip=eip, insn=eip,
                              fetch=fetch)
        self.raise_interrupt(event)

    def settle_flags(self, eip: int, cause: str) -> None:
        """Unicorn's flags after a restore to the start of the instruction at ``eip`` (``cause``: a fault
        inside it, or an smc-rerun) name the operation before it over flags already computed (engine notes
        6): make them read as the CPU has them."""
        if self.engine.settle_flags(eip):
            self.events.count("corrected", f"flags-at-{cause}")

    def _fetch_is_later(self, eip: int, address: int) -> bool:
        """A fetch that failed at linear ``address`` as Unicorn translated the block that begins at CS:``eip``
        is reported there, with none of the block run (QEMU 5's translator): falling through into a page not
        present or out of RAM, the frame named an instruction before and the handler saw the block's work
        undone. Where the failing fetch is a later instruction's, make an exit before that instruction
        (``_guarded`` drops it there) so that the block runs up to it and the fetch fails again for it: the
        hardware's frame and state. Returns whether it did."""
        start = self.linear_pc(eip)
        page_end = (start | (PAGE - 1)) + 1
        if address != page_end & 0xFFFFFFFF:    # (a block spans two pages at most: it failed at the second)
            return False
        try:
            code = self.read_linear(start, page_end - start)
        except GuestFault:
            return False
        mode, offset = 32 if self.engine.segment("cs").big else 16, 0
        while offset < len(code):               # the instruction that reaches the page
            insn = decode_at(code, offset, start, mode)
            if insn is None or offset + insn.size > len(code):
                break
            offset += insn.size
        reaching = (start + offset) & 0xFFFFFFFF
        if offset == 0 or reaching in self.guards:
            # (its own fetch; or an exit already stops the block there and Unicorn still failed before it:
            # Capstone and Unicorn disagree on a length, and the fault is reported as Unicorn reports it)
            return False
        self.events.count("corrected", "fetch-fault-at-block-start")
        self.guard({reaching: None})
        return True

    def _on_bad_access(self, uc, access: int, address: int, size: int, value: int, _) -> bool:
        kind = {unicorn.UC_MEM_FETCH_UNMAPPED: "fetch", unicorn.UC_MEM_FETCH_PROT: "fetch",
                unicorn.UC_MEM_WRITE_UNMAPPED: "write", unicorn.UC_MEM_WRITE_PROT: "write"}.get(access, "read")
        if self._bad_access_at is None:         # the first: the fault (a helper may make more, below)
            self._last_access = (kind, address)
            self._bad_access_at = (self.engine.read(X.UC_X86_REG_EIP), self.engine.counter())
            if self._bad_access_state is None:
                self._bad_access_state = uc.context_save()
            else:
                uc.context_update(self._bad_access_state)
            uc.emu_stop()                       # (no hook of the next instruction runs if a helper runs on)
        return False                            # emu_start fails; execute() turns it into #GP(0)

    def _rewind_to_bad_access(self, eip: int) -> int:
        """Unicorn stops at the first bad access of an inline load or store; a store made by a helper
        (fnstenv, fnsave, fxsave, xsave, fstp m80, fbstp, cmpxchg8b) goes on with its other stores, the
        instruction completes (fnsave reinitialises the FPU) and the stop comes after it, where the next
        instruction may already be counted. Put the CPU back as it was at the fault. Returns the EIP of
        the faulting instruction."""
        if self._bad_access_at is None or self._bad_access_at[0] == eip:
            return eip
        at, counted = self._bad_access_at
        self.uc.context_restore(self._bad_access_state)
        extra = self.engine.counter() - counted     # (the context holds no counter)
        self.instructions -= extra
        self.time -= extra
        self.events.count("corrected", "store-fault-ran-on")
        return at

    # --- port I/O ---------------------------------------------------------------------------------------
    def _io_allowed(self, port: int, size: int) -> str | None:
        """The event kind of an allowed access (``io`` when the hardware allowed it, ``virtual-io`` when a
        monitor answered for its virtual CPU and so completes it against its device model), None if denied."""
        verdict = self.ops.io_allowed(self, port, size) if self.ops is not None else None
        if verdict is not None:
            return VIRTUAL_IO if verdict else None
        cpl = self.cpl()
        iopl = (self.reg("eflags") >> IOPL_SHIFT) & 3
        return IO if cpl <= iopl or ioperm.bitmap_allows(self.address_space(), self.table("tr"), port, size) \
            else None

    def _deny_io(self, port: int) -> None:
        eip = self.reg("eip")                           # Unicorn reports I/O hooks at the instruction
        # The instruction still completes after the hook (ins/outs move ESI/EDI/ECX, and EIP moves on): put
        # them back, so that the state at a fault that follows (a triple fault) is at the instruction.
        restore = {name: self.reg(name) for name in ("esi", "edi", "ecx")} | {"eip": eip}
        self.stop_chunk(Interrupt(GP, EXCEPTION, 0, eip=eip, insn=eip,
                                  why=f"port {port:#x} at CPL {self.cpl()} > IOPL"), restore)

    def _on_in(self, uc, port: int, size: int, _) -> int:
        kind = self._io_allowed(port, size)
        if kind is None:
            self._deny_io(port)
            return self.reg("eax") & ((1 << (8 * size)) - 1)    # leave EAX as it was
        return self.port_read(port, size, kind)

    def _on_out(self, uc, port: int, size: int, value: int, _) -> None:
        kind = self._io_allowed(port, size)
        if kind is None:
            self._deny_io(port)
            return
        self.port_write(port, size, value, kind)

    def port_read(self, port: int, size: int, kind: str = VIRTUAL_IO) -> int:
        """A port read that was allowed: by the hardware check above (``kind`` io), or by a monitor emulating
        I/O (virtual-io, the default: emulation routines call this)."""
        self.events.count(kind, self.ports.name(port))
        return self.ports.read(port, size)

    def port_write(self, port: int, size: int, value: int, kind: str = VIRTUAL_IO) -> None:
        """A port write that was allowed (see port_read)."""
        self.events.count(kind, self.ports.name(port))
        if self.ports.write(port, size, value):
            self.devices_changed = True         # the PIT or PIC changed: the run loop plans again
            if self._running:
                self.stop_chunk()

    def _exit_port(self, code: int) -> None:
        self.finish(EXIT_PORT, code)
