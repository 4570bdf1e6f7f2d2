"""What each monitor did with each guest instruction: a run with per-instruction records, for ``popek report``.

A traced run is an ordinary run (``popek.monitors.base.run``) with four recorders attached, each built on a
facility the machine or the monitor already has, so that nothing is guessed:

- **executed in place**: a code hook over the guest's loaded image counts each instruction that ran there
  (natively, and under monitors that run the guest directly: trap, pv, hvm). Under ``bt`` guest code runs
  from the translation cache, so nothing executes in place;
- **monitor entries**: the monitor's ``intercept`` (every event reaches it before the guest's IDT) is
  wrapped, and the event counts that change while it handles one event are charged to the instruction that
  raised it (``Interrupt.insn``, or its ``eip``): trap's #GP → trap + emulate, pv's ``int 0x82`` →
  hypercall, reflected faults;
- **VM exits**: hvm's exit trace (``trace_exits``: the address and reason of every exit, up to its limit);
- **translations**: bt's own record of how it translated each guest instruction
  (``BinaryTranslation.translation_map``), read before every flush of its cache and at the end;
- **leaks**: the divergence observer (``popek.experiments.divergence.Observer``) records what each
  sensitive-unprivileged instruction read; paired with the native run, an instruction that read different
  state leaked the monitor's state to the guest.

What a recorder cannot see is said (``Trace.limits``), never filled in.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from unicorn import UC_HOOK_CODE

from popek.experiments.divergence import Observer


@dataclass
class Trace:
    monitor: str
    executed: Counter = field(default_factory=Counter)                  # guest address -> executions in place
    entries: dict[int, Counter] = field(default_factory=dict)          # address -> {(kind, name): n}
    translated: dict[int, str] = field(default_factory=dict)           # address -> "ident" | "rewritten" | "callout NAME"
    observations: list = field(default_factory=list)                   # divergence.Observation
    limits: list[str] = field(default_factory=list)                    # what this trace cannot attribute

    def charge(self, address: int, kind: str, name: str, n: int = 1) -> None:
        self.entries.setdefault(address, Counter())[(kind, name)] += n


def _snapshot(events) -> dict[tuple[str, str], int]:
    return {(k, n): c for k, names in events.to_dict().items() for n, c in names.items()}


def traced_run(guest, monitor: str, options: dict | None = None, max_instructions: int | None = None,
               profile="modern"):
    """Run ``guest`` (a loaded ``Guest``) under ``monitor`` with the recorders attached: (RunResult, Trace)."""
    from popek.isa import language
    from popek.isa.classify import Classifier
    from popek.machine.machine import Machine
    from popek.monitors import get_monitor
    from popek.monitors.base import DEFAULT_BUDGET, run

    options = dict(options or {})
    if monitor == "hvm":
        options.setdefault("trace_exits", True)
    ops = get_monitor(monitor, **options)
    machine = Machine()
    machine.load(guest)
    trace = Trace(monitor)
    observer = Observer(Classifier(language.bundled()))
    observer.attach(machine)

    def executed(uc, address, size, _):
        trace.executed[address] += 1
    for address, data in guest.segments:
        machine.uc.hook_add(UC_HOOK_CODE, executed, None, address, address + len(data) - 1)

    original = ops.intercept
    exits_traced = getattr(ops, "trace", None) is not None     # hvm places its exits itself, below

    def intercept(m, event):
        before = _snapshot(m.events)
        handled = original(m, event)
        after = _snapshot(m.events)
        at = event.insn or event.eip
        for key, n in after.items():
            if n != before.get(key, 0) and not (exits_traced and key[0] == "exit"):
                trace.charge(at, *key, n - before.get(key, 0))
        return handled
    ops.intercept = intercept

    translation_map = getattr(ops, "translation_map", None)
    if translation_map is not None:
        _keep_translations(ops, trace)

    result = run(machine, ops, DEFAULT_BUDGET if max_instructions is None else max_instructions)
    if profile is not None:
        from popek.cost import apply
        apply(result, profile)
    records = getattr(ops, "trace", None)
    if records is not None:
        from popek.monitors.hvm.monitor import TRACE_MAX
        for r in records:
            trace.charge(r.address, "exit", r.reason_name)
        if len(records) >= TRACE_MAX:
            trace.limits.append(f"hvm keeps the first {TRACE_MAX:,} exits: later exits are counted in the "
                                f"totals but not placed on the listing")
    trace.observations = observer.records
    if len(observer.records) >= Observer.LIMIT:
        trace.limits.append(f"the first {Observer.LIMIT:,} executions of sensitive-unprivileged instructions "
                            f"were observed for leaks, not the later ones")
    if translation_map is not None:
        trace.limits.append("bt records how each instruction was translated, not how often each callout ran "
                            "(the totals are in the event counts)")
    elif not trace.executed and monitor != "native" and result.guest_instructions:
        trace.limits.append(f"{monitor} does not run guest code in place and keeps no per-instruction record: "
                            f"its work is in the event counts only")
    return result, trace


def _keep_translations(ops, trace: Trace) -> None:
    """Read bt's translation map before its cache forgets it (a flush) and when the run ends (detach)."""
    detach = ops.detach

    def keep():
        trace.translated.update(ops.translation_map())

    def on_detach(machine):
        keep()
        detach(machine)
    ops.detach = on_detach
    attach = ops.attach

    def on_attach(machine):
        attach(machine)
        cache_flush = ops.cache.flush

        def on_flush():
            keep()
            cache_flush()
        ops.cache.flush = on_flush
    ops.attach = on_attach
