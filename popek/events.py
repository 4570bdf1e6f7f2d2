"""The one vocabulary of events: every kind and name a machine or a monitor may count (DESIGN §3.4).

A run's ``events`` document is ``{kind: {name: count}}``. This module says, for every kind, what one event
is, who counts it, which names it takes and whether it costs anything. ``popek.machine.result.Events``
refuses a kind that is not here, ``check`` names every undocumented (kind, name) in a run document (the
tests run it over every guest and monitor), and the cost model (``popek.cost``) prices exactly the kinds
this module calls priced. A new monitor adds rows here, never a string of its own.

Names come in families: the canonical instruction names of DESIGN §3.1, the SDM's exception names (``#GP``),
software interrupts (``int 0x80``, ``int3``, ``into``), external interrupt vectors (``vector 0x20``), the
machine's devices, VT-x exit reasons, Xen hypercalls and sun4v hypervisor functions. A kind that takes
fixed names lists each with what it means.

Roles: ``guest`` events happen on the bare machine too (exceptions, interrupts, port I/O: what the guest
itself asks for); ``monitor`` events are work a technique adds (traps, callouts, translations, exits,
hypercalls, shadow paging); ``info`` events are counted for the record and cost nothing by themselves
(bytes of translation cache, clocks spent halted, timer edges whose interrupt is counted as such).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

GUEST, MONITOR, INFO = "guest", "monitor", "info"
# Kinds named in code (the machine's port hooks, the virtual delivery); the rest are named where counted.
IO, VIRTUAL_IO, REFLECT = "io", "virtual-io", "reflect"
ROLES = (GUEST, MONITOR, INFO)

# --- name families ---------------------------------------------------------------------------------------
# DESIGN §3.1: the canonical instruction names.
SENSITIVE_UNPRIVILEGED = ("sgdt sidt sldt smsw str pushf popf lar lsl verr verw push_seg pop_seg mov_from_seg "
                          "mov_to_seg call_far jmp_far ret_far int iret").split()
PRIVILEGED = ("lgdt lidt lldt ltr lmsw clts mov_cr mov_dr invlpg hlt cli sti in out ins outs rdmsr wrmsr rdtsc "
              "rdpmc cpuid wbinvd invd").split()
EXTENDED = ("int3 into int1 syscall sysret sysenter sysexit swapgs rdtscp rsm stac clac xsetbv monitor mwait "
            "invpcid invlpga wbnoinvd getsec").split()
INSTRUCTIONS = frozenset(SENSITIVE_UNPRIVILEGED + PRIVILEGED + EXTENDED)

# SDM Vol. 3A Table 6-1 mnemonics (popek.machine.faults.NAMES); kept here so this module imports nothing.
EXCEPTIONS = frozenset("#DE #DB NMI #BP #OF #BR #UD #NM #DF #CSO #TS #NP #SS #GP #PF #MF #AC #MC #XM #VE #CP"
                       .split())
_VECTOR = re.compile(r"vector 0x[0-9a-f]{1,2}")
_SOFTWARE = re.compile(r"int 0x[0-9a-f]{1,2}|int3|into")

# The machine's devices (popek.machine.devices: each device's ``name``; ``unclaimed`` is a port nobody owns).
DEVICES = frozenset({"com1", "exit", "pic", "pit", "unclaimed"})

# VT-x basic exit reasons (SDM Vol. 3D appendix C), the ones popek's hvm models (abi/hvm.md), by SDM name.
EXIT_REASONS = frozenset({
    "EXCEPTION_NMI", "EXTERNAL_INTERRUPT", "TRIPLE_FAULT", "INTERRUPT_WINDOW", "CPUID", "HLT", "INVD", "INVLPG",
    "RDPMC", "RDTSC", "VMCALL", "CR_ACCESS", "DR_ACCESS", "IO_INSTRUCTION", "MSR_READ", "MSR_WRITE", "GDTR_IDTR",
    "LDTR_TR", "EPT_VIOLATION", "WBINVD",
    # The VMX instructions' own reasons (they always exit in non-root operation).
    "VMCLEAR", "VMLAUNCH", "VMPTRLD", "VMPTRST", "VMREAD", "VMRESUME", "VMWRITE", "VMXOFF", "VMXON", "INVEPT",
    "INVVPID", "VMFUNC",
    # AMD-V exit codes (APM Vol. 2 appendix C) by their names without VMEXIT_, for --vendor svm; the CR, DR and
    # exception families carry the register number or vector (CR3_WRITE, DR7_READ, EXCP14).
    "PUSHF", "POPF", "IRET", "SWINT", "INTR", "SHUTDOWN", "VINTR", "INVD", "IOIO", "MSR", "IDTR_READ", "GDTR_READ",
    "LDTR_READ", "TR_READ", "IDTR_WRITE", "GDTR_WRITE", "LDTR_WRITE", "TR_WRITE", "NPF", "VMMCALL", "VMRUN", "VMLOAD",
    "VMSAVE", "STGI", "CLGI", "SKINIT", "INVLPGA",
})
_SVM_FAMILY = re.compile(r"(CR|DR)([0-9]|1[0-5])_(READ|WRITE)|EXCP([0-9]|[12][0-9]|3[01])")

# Xen's 32-bit PV hypercalls (xen/include/public/xen.h) and sun4v hypervisor API functions
# (Linux arch/sparc/include/asm/hypervisor.h), by their names in those headers.
XEN_HYPERCALLS = frozenset({
    "set_trap_table", "mmu_update", "set_gdt", "stack_switch", "set_callbacks", "fpu_taskswitch",
    "sched_op_compat", "update_descriptor", "memory_op", "multicall", "update_va_mapping", "set_timer_op",
    "xen_version", "console_io", "vm_assist", "iret", "vcpu_op", "mmuext_op", "sched_op", "event_channel_op",
    "hvm_op", "unknown"})
SUN4V_FUNCTIONS = frozenset({
    "mach_exit", "mach_desc", "cpu_yield", "cpu_qconf", "cpu_myid", "cpu_mondo_send", "mmu_tsb_ctx0",
    "mmu_demap_page", "mmu_map_perm_addr", "mmu_enable", "mmu_map_addr", "mmu_unmap_addr", "tod_get",
    "cons_getchar", "cons_putchar", "cons_read", "cons_write", "ldc_tx_qconf", "ldc_tx_qinfo", "ldc_tx_get_state",
    "ldc_tx_set_qtail", "ldc_rx_qconf", "ldc_rx_qinfo", "ldc_rx_get_state", "ldc_rx_set_qhead", "bad-trap"})


@dataclass(frozen=True)
class Family:
    """An open set of names, documented once (``what``) and checked by ``contains``."""

    what: str
    members: frozenset = frozenset()
    pattern: re.Pattern | None = None

    def contains(self, name: str) -> bool:
        return name in self.members or (self.pattern is not None and self.pattern.fullmatch(name) is not None)


INSTRUCTION = Family("a canonical instruction name (DESIGN §3.1)", INSTRUCTIONS)
EXCEPTION = Family("an exception, by the SDM's mnemonic (#DE, #GP, #PF, ...)", EXCEPTIONS)
SOFTWARE = Family("a software interrupt: 'int 0xNN', 'int3' or 'into'", pattern=_SOFTWARE)
EXTERNAL = Family("an external interrupt by IDT vector: 'vector 0xNN'", pattern=_VECTOR)
ANY_EVENT = Family("an exception, software interrupt or external interrupt, by the names above",
                   EXCEPTIONS, re.compile(f"{_SOFTWARE.pattern}|{_VECTOR.pattern}"))
DEVICE = Family("a device of the machine: " + ", ".join(sorted(DEVICES)), DEVICES)
EXIT_REASON = Family("a VT-x basic exit reason by its SDM name, or an AMD-V exit code by its APM name (--vendor svm)",
                     EXIT_REASONS, _SVM_FAMILY)
HYPERCALL = Family("a Xen hypercall (pv) or a sun4v hypervisor function (sun4v) by its header name",
                   XEN_HYPERCALLS | SUN4V_FUNCTIONS)


@dataclass(frozen=True)
class Name:
    """One fixed name of a kind. ``role`` overrides the kind's (an ``info`` name of a priced kind)."""

    what: str
    role: str | None = None
    unit: str = "events"


@dataclass(frozen=True)
class Kind:
    name: str
    what: str
    counted_by: tuple[str, ...]         # "machine" (every run) or monitor names, those that exist and to come
    role: str
    names: dict[str, Name] = field(default_factory=dict)
    family: Family | None = None
    # A callout that runs an emulation routine also costs that routine: names in ``family`` are priced as
    # this kind's price plus ``includes``'s price for the same name.
    includes: str | None = None

    def __post_init__(self):
        assert self.role in ROLES, self.role
        assert self.names or self.family, f"kind {self.name} documents no names"

    def knows(self, name: str) -> bool:
        return name in self.names or (self.family is not None and self.family.contains(name))

    def role_of(self, name: str) -> str:
        fixed = self.names.get(name)
        return fixed.role or self.role if fixed is not None else self.role

    def unit_of(self, name: str) -> str:
        fixed = self.names.get(name)
        return fixed.unit if fixed is not None else "events"


def _kinds(*kinds: Kind) -> dict[str, Kind]:
    return {k.name: k for k in kinds}


DEPRIVILEGING = ("trap", "bt", "pv")
KINDS: dict[str, Kind] = _kinds(
    # --- what the guest does: the same on the bare machine and under every monitor ---------------------
    Kind("exception", "an exception delivered through the guest's IDT (real natively, virtual under a monitor); "
         "priced as the hardware's delivery plus the handler's iret", ("machine", "trap", "bt", "pv"), GUEST,
         {"triple-fault": Name("the run ended in a triple fault (not a delivery)", INFO)}, EXCEPTION),
    Kind("software-interrupt", "an int n, int3 or into delivered through the guest's IDT, with its iret",
         ("machine", "trap", "bt", "pv"), GUEST, family=SOFTWARE),
    Kind("external-interrupt", "an interrupt from the PIC delivered through the guest's IDT, with its iret",
         ("machine", "trap", "bt", "pv", "hvm"), GUEST, family=EXTERNAL),
    Kind("delivery-fault", "a fault raised while delivering another event (it escalates, SDM Table 6-5)",
         ("machine", "trap", "bt", "pv"), GUEST, family=EXCEPTION),
    Kind("io", "a port access the hardware allowed, completed by a device of the machine", ("machine",), GUEST,
         family=DEVICE),
    Kind("virtual-io", "a port access a monitor decided and completed against its device model (the access "
         "never reaches a real device)", ("trap", "bt", "pv", "hvm", "sun4v"), MONITOR, family=DEVICE),
    Kind("timer", "an edge of the PIT output (its interrupt is counted as external-interrupt)", ("machine",), INFO,
         {"irq0": Name("IRQ 0 raised at the PIC")}),
    Kind("idle", "time the CPU spent halted (sun4v: waiting in cpu_yield), skipped to the next timer event",
         ("machine", "sun4v"), INFO,
         {"clocks": Name("instruction-clocks skipped while halted", unit="clocks")}),
    Kind("corrected", "an instruction where Unicorn departs from the SDM and the bare machine did what the "
         "hardware does (popek.machine.quirks; docs/machine.md)", ("machine",), INFO,
         {"lock-not-lockable": Name("LOCK on an instruction that does not take it: #UD"),
          "pop-8f-reg": Name("8F with ModRM.reg other than 0 (XOP, not in CPUID): #UD"),
          "c6-c7-reg": Name("C6/C7 with ModRM.reg other than 0 (XBEGIN/XABORT, no RTM): #UD"),
          "vex": Name("a VEX prefix the CPUID does not report (no AVX): #UD"),
          "register-only-memory-form": Name("the memory form of a register-only instruction: #UD"),
          "ret-imm16-zero-extended": Name("ret/retf imm16 >= 0x8000: the immediate zero-extended"),
          "int6-software-interrupt": Name("int 6 taken as the software interrupt it is, not #UD"),
          "smc-rerun": Name("a store into the running block that Unicorn ran again: counted once "
                            "(popek.machine.selfmod)"),
          "smc-rerun-unseen": Name("a byte-wise store Unicorn restarted whose rerun was not seen (the count may "
                                   "be one high)")}),
    Kind("machine-error", "where the bare machine knowingly computes something else than the hardware (a "
         "Unicorn bug it cannot correct; docs/machine.md): the run's result is the machine's, not the CPU's",
         ("machine",), INFO,
         {"smc-rerun-stored-another-value": Name("a store into the running block whose rerun stored another "
                                                 "value: the first attempt had changed state the rerun read "
                                                 "(rcl/rcr's carry)")}),
    Kind("umip", "bookkeeping of the CR4.UMIP model (popek run --umip)", ("machine",), INFO,
         {"blocks-rescanned": Name("translated blocks scanned again for the five UMIP instructions")}),
    Kind("hvm", "bookkeeping of hvm's search for exiting instructions (popek.machine.watch): not an exit",
         ("hvm",), INFO,
         {"blocks-rescanned": Name("translated blocks retranslated so that a newly found exiting instruction "
                                   "gets its hook")}),
    Kind("sun4v", "bookkeeping of sun4v's search for hyperprivileged instructions (popek.machine.watch): not a "
         "trap", ("sun4v",), INFO,
         {"blocks-rescanned": Name("translated blocks retranslated so that a newly found hyperprivileged "
                                   "instruction gets its hook")}),
    # --- trap-and-emulate --------------------------------------------------------------------------------
    Kind("trap", "an instruction that left the deprivileged guest for the monitor: a #GP at an instruction "
         "with an emulation routine, or a port access the real CPU refused (pv: an access to a granted port)",
         ("trap", "pv"), MONITOR,
         family=INSTRUCTION),
    Kind("emulate", "an instruction carried out by its emulation routine against the virtual CPU",
         ("trap",), MONITOR, family=INSTRUCTION),
    Kind("reflect", "a guest event the monitor received and delivered through the guest's virtual IDT in "
         "software (the guest's own delivery is counted under its machine kind as well)",
         ("trap", "bt", "pv"), MONITOR, family=ANY_EVENT),
    Kind("inject", "an external interrupt a monitor took and gave to the guest (its cost is in reflect, or, "
         "under hvm, in the EXTERNAL_INTERRUPT exit)", ("trap", "hvm"), INFO, family=EXTERNAL),
    Kind("shadow", "shadow structures a monitor keeps for the guest's tables", ("trap", "bt", "pv", "hvm"), MONITOR, {
        "gdt": Name("shadow GDT rebuilt (lgdt, or a traced descriptor change)"),
        "ldt": Name("shadow LDT rebuilt (lldt)"),
        "tss": Name("shadow TSS stack fields rebuilt (ltr)"),
        "paging": Name("shadow paging state rebuilt (mov cr0/cr3/cr4, invlpg): a shadow TLB flush"),
        "hidden-page-fault": Name("a page fault the guest's own tables allow: the monitor fixed its shadow and "
                                  "resumed the guest (a hidden fault)"),
        "guest-table-writes": Name("traced stores into the guest's GDT, LDT or TSS stack fields"),
        "page-fault": Name("a page fault the shadow pager examined (a walk of the guest's page tables) and found "
                           "to be the guest's own: a true fault, given to the guest"),
        "pte-write": Name("a trapped write to a guest page-table entry (write-protected tables)"),
        "tlb-flush": Name("the monitor flushed its shadow page tables for a guest TLB flush"),
    }),
    # --- binary translation --------------------------------------------------------------------------------
    Kind("translation", "guest code translated into the translation cache", ("bt",), MONITOR, {
        "instructions": Name("guest instructions translated"),
        "runs": Name("translation runs (one call of the translator)", INFO),
        "units": Name("translation units made (at most 12 instructions each)", INFO),
        "cache-bytes": Name("bytes of translated code in the cache at the end", INFO, "bytes"),
        "glue-bytes": Name("bytes of glue (exit stubs, lookups) in the cache at the end", INFO, "bytes"),
    }),
    Kind("callout", "the translated code called into the monitor: for an instruction (its emulation routine "
         "runs too), or for the translator's own needs", ("bt",), MONITOR, {
             "exit": Name("an unchained exit: a direct branch reached its stub (target found or translated)"),
             "lookup": Name("an inline-cache miss of a return or indirect branch"),
             "continue": Name("a run ended at its length cap: continue in the next translation"),
             "poison": Name("an instruction start of an invalidated unit was entered"),
             "near-branch": Name("a jmp through r/m, or a near branch with a 16-bit operand or address size, carried out by the monitor"),
             "fip": Name("before a store of the x87 state (fnstenv, fnsave, fxsave, xsave): the guest's EIP of the last x87 instruction put into FIP"),
         }, INSTRUCTION, includes="emulate"),
    Kind("chain", "translator bookkeeping on a branch", ("bt",), MONITOR, {
        "patched": Name("a direct branch linked to its target's translation (later runs of it are chained: a "
                        "jump inside the cache, with no monitor work)")}),
    Kind("lookup", "the monitor's own guest-address to translation index", ("bt",), MONITOR, {
        "hit": Name("found a translation"), "miss": Name("found none: a translation follows"),
        "filled": Name("an inline-cache way or cross-page exit filled in", INFO)}),
    Kind("invalidation", "translation units invalidated because their guest code was written", ("bt",), MONITOR, {
        "guest-write": Name("a unit invalidated by a guest store"),
        "host-write": Name("a unit invalidated by a store of the monitor or the machine (a frame, a routine)")}),
    Kind("flush", "the whole translation cache dropped", ("bt",), MONITOR, {
        "cache-full": Name("no room for a translation"),
        "address-space": Name("the guest changed its address space (paging)")}),
    Kind("resource", "an access the monitor refused to protect itself", ("bt",), INFO, {
        "cache-reads": Name("guest reads of the translation cache, answered with the bare machine's #GP "
                            "(counted as exception)")}),
    # --- the interpreter -----------------------------------------------------------------------------------
    Kind("interpret", "the pure interpreter's work", ("emulate",), MONITOR, {
        "instructions": Name("instructions stepped through the interpreter's dispatch"),
        "decoded": Name("instructions decoded and classified (once per address and contents)"),
        "code-changed": Name("addresses classified again because their bytes changed", INFO)}),
    Kind("sensitive", "executions of listed instructions, by canonical name (their cost is in interpret)",
         ("emulate",), INFO, family=INSTRUCTION),
    # --- techniques to come: their rows are here so that their events are priced from the first run ------
    Kind("exit", "a VM exit and the VM entry that resumes the guest, by exit reason (VT-x basic exit reason; "
         "AMD-V exit code under --vendor svm)", ("hvm",), MONITOR, family=EXIT_REASON),
    Kind("hypercall", "a call into the hypervisor by the guest kernel and its return, by function name",
         ("pv", "sun4v"), MONITOR, family=HYPERCALL),
    Kind("multicall", "one operation carried out inside a multicall (its entry is the multicall hypercall)",
         ("pv",), MONITOR, family=HYPERCALL),
    Kind("upcall", "an event delivered to a paravirtual guest's callback (Xen event channels)", ("pv",), MONITOR,
         {"event": Name("an upcall to the event callback"),
          "failsafe": Name("an upcall to the failsafe callback")}),
    Kind("crash", "the hypervisor ended the domain (Xen's domain_crash; the run ends with reason crash)", ("pv",),
         INFO, {"domain": Name("the domain crashed: an event with no trap-table entry, an upcall with no "
                               "callback, an upcall frame that could not be written")}),
    Kind("direct-trap", "an int n from guest user mode delivered straight to the guest kernel through a trap "
         "table entry, with no hypervisor work per call (Xen's direct trap gates)", ("pv",), GUEST,
         family=SOFTWARE),
    Kind("hypertrap", "a hyperprivileged trap: the guest kernel touched state that belongs to the hypervisor "
         "(sun4v: a port other than the strand's timer and interrupt controller, an MSR, a machine-wide cache "
         "flush, by instruction; or memory beyond the domain's real addresses), answered with #GP(0) through "
         "the guest's own IDT", ("sun4v",), MONITOR,
         {"memory": Name("an access beyond the domain's real addresses (0 .. its memory size)")},
         INSTRUCTION),
)


def kind(name: str) -> Kind:
    """The documented kind ``name``; KeyError with a pointer to this module otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"event kind {name!r} is not documented in popek/events.py") from None


def undocumented(events: dict[str, dict[str, int]]) -> list[str]:
    """Every (kind, name) of a run's ``events`` document that this vocabulary does not describe."""
    problems = []
    for k, names in events.items():
        known = KINDS.get(k)
        if known is None:
            problems.append(f"kind {k!r}")
            continue
        problems.extend(f"{k}: {n!r}" for n in names if not known.knows(n))
    return problems


# The kinds that each count one passage of control from the guest into the monitor: a trap, a callout from
# translated code, a hypercall, an event the monitor delivered in software, an upcall, a VM exit, a
# hyperprivileged trap. (emulate, translation, shadow... are work done during such an entry, not entries.)
ENTRY_KINDS = ("trap", "callout", "hypercall", "reflect", "upcall", "exit", "hypertrap")


def monitor_entries(events: dict[str, dict[str, int]]) -> int:
    """How many times a run entered the monitor (ENTRY_KINDS): the number to compare across techniques."""
    return sum(sum(events.get(k, {}).values()) for k in ENTRY_KINDS)


def monitor_work(events: dict[str, dict[str, int]]) -> dict[str, int]:
    """Event counts by kind for the kinds that are a technique's own work (role ``monitor``), in the units
    they count (``info`` names such as cache bytes are left out)."""
    work: dict[str, int] = {}
    for k, names in events.items():
        known = KINDS.get(k)
        if known is None:
            continue
        n = sum(c for name, c in names.items() if known.role_of(name) == MONITOR)
        if n:
            work[k] = n
    return work
