"""`popek bench images`: random 4 KiB images run natively and under a monitor; count how their ends differ.

Generated guests (``guestgen``) are well-formed programs; random bytes are not. They find what a
generator does not think of: encodings nobody writes, branches into the middle of instructions, stores
over the code, loads of random selectors, faults in every state. Image ``k`` of seed ``s`` is 4 KiB from
``random.Random(s * 1_000_003 + k)``, and

- an even ``k`` runs *bare*: the bytes at 0x00100000, entered at their first byte in the boot state (the
  boot IDT has no gates, so the first fault ends the run in a triple fault);
- an odd ``k`` runs behind a *prologue* at 0x00100000 that fills a 256-gate IDT, all gates to one handler
  that discards the frame, reloads the boot data selector and stack, and resumes the image at a new
  offset (a multiplicative hash of the fault count), so one image is entered at up to ``RESUMES`` places;
  then the image at 0x00101000. After ``RESUMES`` faults the handler writes exit code 0 to port 0xF4.

Both runs get the same instruction budget and are compared by ``differential.differences``: exit, console,
the visible state, guest RAM and the instruction count. Every outcome is one of

- ``equal``: both runs ended (not on the budget) and nothing differs;
- ``equal up to the budget``: both reached the budget and nothing differs at that instruction: undecided,
  never counted as equal;
- ``divergent``: something differs (and a second native run agrees with the first);
- ``not modelled by the monitor``: the monitor ended its run ``unsupported``, naming what it does not model
  (virtual-8086 mode, ...): a known limit, said, not a silent divergence;
- ``native wrong (machine bug)``: they differ and the native run reported a ``machine-error`` event, where
  the machine knows its result is Unicorn's and not the CPU's (docs/machine.md);
- ``native nondeterministic``: two native runs differ (an rdtsc the guest wrote at run time reads Unicorn's
  host-driven TSC: the machine corrects only those it finds at load, docs/machine.md): nothing can be
  concluded, counted apart.

The first image of each kind of divergence is located (the first instruction after which the runs differ)
and can be saved with ``--save DIR`` as a flat image that ``popek run``/``popek diff`` take as it is.
"""
from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import dataclass, field

IMAGE_SIZE = 0x1000
LOAD = 0x00100000                   # the machine's flat-image address: the prologue, or the bare image
IMAGE = LOAD + 0x1000               # the image behind the prologue
RESUMES = 64                        # faults the prologue's handler resumes from before it ends the run
BATCH = 16                          # images per task of a --jobs pool
BUDGET = 20_000                     # instructions per run (random code loops often; both runs get the same)

PROLOGUE = f"""
        .equ IDT,    0x90000
        .equ STACK,  0x80000
        .equ IMAGE,  {IMAGE:#x}
_start:
        mov ax, ds
        mov [boot_ds], ax
        mov edi, IDT
        mov ecx, 256
        mov eax, handler
        mov edx, cs
        shl edx, 16
        mov dx, ax                      ; low dword: selector:offset[15:0]
        mov ax, 0x8E00                  ; high dword: offset[31:16], present DPL 0 interrupt gate
fill:
        mov [edi], edx
        mov [edi+4], eax
        add edi, 8
        dec ecx
        jnz fill
        lidt [idtr]
        mov esp, STACK
        jmp IMAGE
handler:                                ; every vector: the frame (with or without an error code) is dropped
        mov ax, cs:[boot_ds]
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov esp, STACK
        mov eax, [faults]
        inc eax
        mov [faults], eax
        cmp eax, {RESUMES}
        jae finish
        imul eax, eax, 0x9E3779B1
        shr eax, 20                     ; a new offset in the image, 0..0xfff
        add eax, IMAGE
        push 0x2                        ; EFLAGS: IF clear, TF clear
        push cs
        push eax
        iretd
finish:
        mov al, 0
        out 0xF4, al
        hlt
        .align 4
idtr:
        .word 0x7FF
        .dword IDT
boot_ds:
        .word 0
        .align 4
faults:
        .dword 0
"""


def _prologue() -> bytes:
    from popek.asm import assemble_text
    program = assemble_text(PROLOGUE, "images-prologue", origin=LOAD)
    code = bytes(program.image)
    assert program.origin == LOAD and len(code) <= IMAGE - LOAD, "the prologue must fit below the image"
    return code.ljust(IMAGE - LOAD, b"\x00")


def image(seed: int, k: int, prologue: bytes | None = None) -> bytes:
    """The flat file of image ``k`` of ``seed`` (loaded at 0x00100000, entered at its first byte)."""
    data = random.Random(seed * 1_000_003 + k).randbytes(IMAGE_SIZE)
    if k % 2:
        return (prologue if prologue is not None else _prologue()) + data
    return data


def guest(seed: int, k: int, prologue: bytes | None = None):
    from popek.machine.guest import Guest
    return Guest(f"image-{seed}-{k}{'-prologue' if k % 2 else ''}.bin", ((LOAD, image(seed, k, prologue)),),
                 LOAD, "flat")


@dataclass
class ImagesReport:
    monitor: str
    seed: int
    budget: int
    options: dict = field(default_factory=dict)
    examples: int = 0
    outcomes: dict = field(default_factory=dict)        # outcome -> count
    ends: dict = field(default_factory=dict)            # (native's end reason, prologue?) -> count
    signatures: dict = field(default_factory=dict)      # divergence signature -> count
    first: dict = field(default_factory=dict)           # signature -> image number
    declined: dict = field(default_factory=dict)        # the monitor's `unsupported` reason -> count
    first_declined: dict = field(default_factory=dict)  # such a reason, or NONDETERMINISTIC -> image number
    located: list = field(default_factory=list)         # (k, Divergence) of the first of each kind, located
    seconds: float = 0.0

    def merge(self, other: ImagesReport) -> None:
        self.examples += other.examples
        for mine, theirs in ((self.outcomes, other.outcomes), (self.ends, other.ends),
                             (self.signatures, other.signatures), (self.declined, other.declined)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        for mine, theirs in ((self.first, other.first), (self.first_declined, other.first_declined)):
            for key, k in theirs.items():
                mine[key] = min(k, mine.get(key, k))

    def render(self) -> str:
        given = "".join(f" --{k} {v}" for k, vs in sorted(self.options.items())
                        for v in (vs if isinstance(vs, (list, tuple)) else (vs,)))
        rate = self.examples / self.seconds if self.seconds else 0.0
        lines = [f"popek bench images: native vs {self.monitor}{given}, seed {self.seed}, {self.examples:,} random "
                 f"4 KiB images (half behind a 256-gate IDT that resumes them), budget {self.budget:,} instructions",
                 f"  wall              {self.seconds:.1f} s ({rate:.1f} images/s)"]
        for outcome in OUTCOMES:
            n = self.outcomes.get(outcome, 0)
            share = f" ({100 * n / self.examples:.2f}%)" if self.examples else ""
            lines.append(f"  {outcome:<26}{n:8,}{share}")
        lines.append("  how the native runs ended (bare / behind the prologue):")
        for reason in sorted({r for r, _ in self.ends}):
            lines.append(f"    {reason:<22}{self.ends.get((reason, False), 0):8,}{self.ends.get((reason, True), 0):8,}")
        for why, n in sorted(self.declined.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n:8,}  {why if why.startswith('machine: ') else 'not modelled: ' + why}"
                         f"  (first: image {self.first_declined[why]})")
        if NONDETERMINISTIC in self.first_declined:
            lines.append(f"  {self.outcomes[NONDETERMINISTIC]:8,}  native nondeterministic"
                         f"  (first: image {self.first_declined[NONDETERMINISTIC]})")
        if self.signatures:
            lines.append("  divergences by differing fields:")
            for sig, n in sorted(self.signatures.items(), key=lambda kv: -kv[1]):
                lines.append(f"    {n:8,}  {', '.join(sig)}  (first: image {self.first[sig]})")
        for k, d in self.located:
            lines.append(f"--- image {k} (popek bench images --seed {self.seed} --save DIR writes it) ---")
            lines.append(d.report())
        return "\n".join(lines)


EQUAL, AT_BUDGET, DIVERGENT, NONDETERMINISTIC = ("equal", "equal up to the budget", "divergent",
                                                 "native nondeterministic")
NOT_MODELLED, MACHINE_ERROR = "not modelled by the monitor", "native wrong (machine bug)"
OUTCOMES = (EQUAL, AT_BUDGET, DIVERGENT, MACHINE_ERROR, NOT_MODELLED, NONDETERMINISTIC)


def _share(monitor: str, seed: int, numbers: range | list, budget: int, options: dict) -> ImagesReport:
    from popek.experiments.differential import Divergence, differences, run
    from popek.machine.result import UNSUPPORTED

    report = ImagesReport(monitor, seed, budget, dict(options))
    prologue = _prologue()
    for k in numbers:
        g = guest(seed, k, prologue)
        native = run(g, "native", budget)
        other = run(g, monitor, budget, **options)
        diffs = differences(native, other)
        report.examples += 1
        end = (native.exit.reason, bool(k % 2))
        report.ends[end] = report.ends.get(end, 0) + 1
        if diffs and differences(native, run(g, "native", budget)):
            outcome = NONDETERMINISTIC
            report.first_declined.setdefault(NONDETERMINISTIC, k)
        elif other.exit.reason == UNSUPPORTED:        # the monitor stopped, saying what it does not model
            outcome = NOT_MODELLED
            report.declined[other.exit.why] = report.declined.get(other.exit.why, 0) + 1
            report.first_declined.setdefault(other.exit.why, k)
        elif diffs and native.events.get("machine-error"):    # the machine said its result is not the CPU's
            outcome = MACHINE_ERROR
            for name, n in native.events["machine-error"].items():
                report.declined[f"machine: {name}"] = report.declined.get(f"machine: {name}", 0) + n
                report.first_declined.setdefault(f"machine: {name}", k)
        elif diffs:
            outcome = DIVERGENT
            sig = Divergence(g.name, "native", monitor, diffs, native, other).signature
            report.signatures[sig] = report.signatures.get(sig, 0) + 1
            report.first.setdefault(sig, k)
        else:
            outcome = EQUAL if native.finished and other.finished else AT_BUDGET
        report.outcomes[outcome] = report.outcomes.get(outcome, 0) + 1
    return report


def bench(monitor: str = "bt", examples: int = 2400, *, seed: int = 0, jobs: int = 1, budget: int = BUDGET,
          locate_first: int = 3, options: dict | None = None, save: str | None = None) -> ImagesReport:
    """Run ``examples`` random images under native and ``monitor``; locate the first image of the first
    ``locate_first`` kinds of divergence; with ``save``, write every kind's first image into that folder (of
    divergence, machine bug, not modelled, nondeterministic)."""
    from popek.experiments.differential import compare
    from popek.monitors import get_monitor

    options = dict(options or {})
    get_monitor(monitor, **options)                     # an unknown monitor or a bad control: UsageError now
    started = time.perf_counter()
    report = ImagesReport(monitor, seed, budget, options)
    jobs = max(1, min(jobs, examples or 1))
    if jobs == 1:
        report.merge(_share(monitor, seed, range(examples), budget, options))
    else:
        import multiprocessing
        # small consecutive batches, not every jobs-th image: with two jobs that would give one all the bare
        # images and the other all the (slower) prologue ones
        batches = [range(start, min(start + BATCH, examples)) for start in range(0, examples, BATCH)]
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            parts = pool.starmap(_share, [(monitor, seed, b, budget, options) for b in batches], chunksize=1)
        for part in parts:
            report.merge(part)
    report.seconds = time.perf_counter() - started
    prologue = _prologue()
    firsts = sorted(report.first.items(), key=lambda kv: kv[1])
    for sig, k in firsts[:locate_first]:
        d = compare(guest(seed, k, prologue), "native", monitor, max_instructions=budget, locate=True,
                    options_b=options)
        if d is not None:
            report.located.append((k, d))
    if save:
        os.makedirs(save, exist_ok=True)
        for k in sorted({k for _, k in firsts} | set(report.first_declined.values())):
            with open(os.path.join(save, guest(seed, k, prologue).name), "wb") as f:
                f.write(image(seed, k, prologue))
    return report


def run(args: argparse.Namespace) -> str:
    from popek.monitors.hvm import command as hvm_command
    options = hvm_command.options(args)
    return bench(args.monitor, args.examples, seed=args.seed, jobs=args.jobs, budget=args.max_instructions,
                 locate_first=args.locate, options=options, save=args.save).render()


def arguments(b: argparse.ArgumentParser) -> None:
    from popek import arguments as types
    from popek.monitors.hvm import command as hvm_command
    b.add_argument("--monitor", type=types.monitor_name, default="bt",
                   help="the monitor compared with native (default bt)")
    types.add_campaign(b, 2400, "random images")
    b.add_argument("--max-instructions", type=types.budget, default=BUDGET,
                   help=f"instruction budget of each run (default {BUDGET:,}; a run that reaches it is undecided)")
    b.add_argument("--locate", type=types.in_range(0), default=3,
                   help="kinds of divergence whose first image is located and printed (default 3)")
    b.add_argument("--save", type=types.output_directory, metavar="DIR",
                   help="write the first image of each kind of divergence, machine bug, declined run and "
                        "nondeterministic run into DIR")
    hvm_command.configure(b, trace=False)
