"""`popek bench`: benchmarks that measure in one run and print ratios, never timed tests.

Each benchmark is a function in BENCHMARKS taking the parsed arguments and returning the report text.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import tempfile
import time

from popek.errors import UsageError
from popek.textout import emit


def _scan(args: argparse.Namespace) -> str:
    """`popek scan --strategy linear --format json` against `objdump -d`, per ELF/PE file, and whether the
    sites agree."""
    from popek.errors import BadInput
    from popek.loaders import iter_files

    objdump = shutil.which("objdump")
    if objdump is None:
        raise UsageError("objdump (GNU binutils) is not installed; it is the baseline this benchmark compares with")
    paths = list(args.paths)
    if args.fetch:
        paths.append(_fetch_debs(args.fetch))
    if not paths:
        raise UsageError("give FILEs or directories of ELF/PE binaries, or --fetch DIR to download Debian's")
    lines, ratios = [], []
    for path, error in iter_files(paths):
        if error is not None:
            continue
        try:
            lines += _scan_one(path, objdump, ratios)
        except BadInput:
            continue                     # a directory holds scripts, data, empty files: not benchmarks
    files, popek_s, objdump_s, differ = _scan_one.small
    if files:
        ratios.append(popek_s / max(objdump_s, 1e-6))
        lines.append(f"{files} smaller files (< {SMALL // 1024} KB of code each), together: CPU s objdump -d "
                     f"{objdump_s:6.2f}, popek {popek_s:6.2f}; ratio {ratios[-1]:5.2f}; sites differ in {differ}")
    if not ratios:
        raise UsageError(f"no ELF or PE binary in {', '.join(paths)}")
    head = (f"popek bench scan: {len(ratios)} row(s); CPU-time ratio popek / objdump: worst "
            f"{max(ratios):.2f}, median {sorted(ratios)[len(ratios) // 2]:.2f}")
    return "\n".join([head, *lines])


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


SMALL = 256 * 1024   # files with less code than this are summed into one line


def _scan_one(path: str, objdump: str, ratios: list[float]) -> list[str]:
    from popek.experiments.objdump_oracle import sites_from_listing
    from popek.isa import bundled_classifier
    from popek.loaders import load
    from popek.scanner import scan_image
    from popek.scanner.document import ScanDocument
    from popek.scanner.render import render_json

    classifier = bundled_classifier()          # built once per process, as one `popek scan` run does
    t0 = _cpu()
    image = load(path)
    report = scan_image(image, classifier, "linear")
    render_json(ScanDocument(files=(report,)))  # what `popek scan --format json` writes
    popek_seconds = _cpu() - t0

    with tempfile.TemporaryFile("w+") as listing:
        subprocess.run([objdump, "-d", path], stdout=listing, stderr=subprocess.DEVNULL, check=True)
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        objdump_seconds = child.ru_utime + child.ru_stime - _scan_one.children
        _scan_one.children += objdump_seconds
        listing.seek(0)
        theirs = sites_from_listing(listing.read())
    ours = {(f.address, f.name) for f in report.findings}
    code_bytes = sum(len(r.data) for r in image.regions)
    ratio = popek_seconds / max(objdump_seconds, 1e-6)
    if code_bytes < SMALL:
        small = _scan_one.small
        small[0] += 1
        small[1] += popek_seconds
        small[2] += objdump_seconds
        small[3] += ours != theirs
        return []
    ratios.append(ratio)
    agree = "identical" if ours == theirs else f"popek only {len(ours - theirs)}, objdump only {len(theirs - ours)}"
    return [f"{path} ({image.format}, {code_bytes / 1e6:.1f} MB of code, {report.instructions:,} instructions, "
            f"{len(report.findings):,} findings)",
            f"  CPU s: objdump -d {objdump_seconds:6.2f}, popek {popek_seconds:6.2f} "
            f"({report.instructions / max(popek_seconds, 1e-6) / 1e6:.2f} M insn/s); ratio {ratio:5.2f}; "
            f"sites {len(ours)} vs {len(theirs)} ({agree})"]


_scan_one.children = 0.0
_scan_one.small = [0, 0.0, 0.0, 0]    # files, popek s, objdump s, files whose sites differ

# Large real binaries from Debian (apt-get download, as .ci/run fetches grub): the Xen 4.17 hypervisor's EFI
# image (PE32+), GRUB's i386-pc modules (ELF32 objects), the C library (ELF64).
BENCH_DEBS = ("xen-hypervisor-4.17-amd64", "grub-pc-bin", "libc6")


def _fetch_debs(directory: str) -> str:
    import pathlib
    root = pathlib.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise UsageError("--fetch needs apt-get and dpkg-deb (Debian); give FILEs or directories instead")
    for package in BENCH_DEBS:
        target = root / package
        if target.is_dir():
            continue
        got = subprocess.run(["apt-get", "download", package], cwd=root, capture_output=True, text=True)
        debs = sorted(root.glob(f"{package}_*.deb"))
        if got.returncode != 0 or not debs:
            raise UsageError(f"apt-get download {package} failed: {got.stderr.strip().splitlines()[-1:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(target)], check=True)
        debs[-1].unlink()
    return str(root)


def _differential(args: argparse.Namespace) -> str:
    """Generated guests under native and --monitor: examples run, divergences (the first few shrunk), rate."""
    from popek.experiments.differential import fuzz
    from popek.monitors.hvm import command as hvm_command
    options = hvm_command.options(args)     # --vendor/--controls/--control: hvm only, checked before any work
    return fuzz(args.monitor, args.examples, reference=args.reference, seed=args.seed, jobs=args.jobs,
                shrink_first=args.shrink, options=options).render()


def _differential_arguments(b: argparse.ArgumentParser) -> None:
    from popek import arguments
    b.add_argument("--monitor", type=arguments.monitor_name, default="emulate",
                   help="the monitor compared with the reference (default emulate)")
    b.add_argument("--reference", type=arguments.monitor_name, default="native",
                   help="the reference monitor (default native)")
    arguments.add_campaign(b, 100_000, "generated guests", seed="Hypothesis seed")
    b.add_argument("--shrink", type=arguments.in_range(0), default=3,
                   help="kinds of divergence to shrink and print (default 3)")
    from popek.monitors.hvm import command as hvm_command
    hvm_command.configure(b, trace=False)


def _emulate(args: argparse.Namespace) -> str:
    """The interpreter's cost: one compute-bound guest under native and under emulate, wall time ratio."""
    from popek.asm import assemble_text
    from popek.machine.guest import Guest
    from popek.monitors import run_guest

    from popek.monitors.bt_bench import COMPUTE  # the same compute-bound mix `popek bench bt` uses

    program = assemble_text(COMPUTE.format(n=args.iterations), name="compute")
    guest = Guest("compute.s", ((program.origin, program.image),), program.entry, "asm")
    native = run_guest(guest, "native")
    emulated = run_guest(guest, "emulate")
    same = (native.state, native.console, native.guest_instructions) == \
        (emulated.state, emulated.console, emulated.guest_instructions)
    n = native.guest_instructions
    return "\n".join([
        f"popek bench emulate: a compute-bound guest, {n:,} instructions ({args.iterations:,} iterations of 11)",
        f"  native    {native.wall_seconds:8.3f} s   {n / native.wall_seconds / 1e6:9.1f} M instructions/s",
        f"  emulate   {emulated.wall_seconds:8.3f} s   {n / emulated.wall_seconds / 1e6:9.1f} M instructions/s",
        f"  ratio emulate / native   {emulated.wall_seconds / native.wall_seconds:8.1f}",
        f"  same result: {'yes' if same else 'NO'}; emulate interpreted "
        f"{emulated.events.get('interpret', {}).get('instructions', 0):,} instructions",
    ])


def _emulate_arguments(b: argparse.ArgumentParser) -> None:
    from popek import arguments
    b.add_argument("--iterations", type=arguments.count, default=200_000, help="loop iterations (default 200000)")


def _trap(args: argparse.Namespace) -> str:
    """Classic trap-and-emulate: native speed on a compute-bound guest, and what one trap costs."""
    import os
    import platform

    import unicorn

    from popek.asm import assemble_text
    from popek.machine import Guest, Machine
    from popek.monitors import get_monitor, run_guest
    from popek.monitors.base import run as run_on

    def guest(text: str, name: str) -> Guest:
        program = assemble_text(text, name=name)
        return Guest(name, ((program.origin, program.image),), program.entry, "asm")

    n = 200_000
    compute = guest("_start: mov ecx, 20000000\nagain: add eax, ecx\n xor ebx, eax\n rol ebx, 3\n dec ecx\n"
                    " jnz again\n out 0xf4, al\n", "compute.s")
    # Privileged at the guest kernel's real ring, ordinary instructions natively (the guest boots at CPL 0).
    cli_sti = guest(f"_start: mov ecx, {n // 2}\nagain: cli\n sti\n loop again\n out 0xf4, al\n", "cli_sti.s")
    outs = guest(f"_start: mov ecx, {n // 10}\nagain: out 0x80, al\n loop again\n out 0xf4, al\n", "out.s")

    def extra_cost(g: Guest, traps: int, old_path: bool = False) -> float:
        """µs per trap: (trap run - native run) / traps, each the best of three runs in this process."""
        base = min(run_guest(g, "native").wall_seconds for _ in range(3))
        best = None
        for _ in range(3):
            machine = Machine()
            if old_path:
                machine.engine._live = None     # the machine's previous #GP path: context save and restore
            machine.load(g)
            trapped = run_on(machine, get_monitor("trap"))
            emulated = sum(trapped.events["emulate"].values())
            if emulated != traps + 1:                           # + the final out to the exit port
                raise RuntimeError(f"{emulated} emulations, expected {traps + 1}: {trapped.events}")
            best = trapped.wall_seconds if best is None else min(best, trapped.wall_seconds)
        return (best - base) / traps * 1e6

    run_guest(cli_sti, "trap")                                  # build the classifier, warm the caches
    native = run_guest(compute, "native")
    k = native.guest_instructions
    cli_cost = extra_cost(cli_sti, n)
    out_cost = extra_cost(outs, n // 10)
    old_cost = extra_cost(cli_sti, n, old_path=True)
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    floor = _round_trip()
    return "\n".join([
        f"popek bench trap: measured on {cpu}, {os.cpu_count()} CPUs (load average {load:.1f}), "
        f"CPython {platform.python_version()}, unicorn {unicorn.__version__}",
        f"  native, compute-bound guest            {k / native.wall_seconds / 1e6:8.1f} M guest instructions/s "
        f"({k:,} in {native.wall_seconds:.2f} s)",
        f"  one trapped-and-emulated cli or sti    {cli_cost:8.2f} µs   (#GP to the INTR hook; target <= 5; "
        f"{cli_cost / floor:.0f}x the floor)",
        f"  one trapped-and-emulated out           {out_cost:8.2f} µs   (decided in the I/O hook)",
        f"  cli or sti, with the old #GP path      {old_cost:8.2f} µs   (context save/restore per #GP)",
        f"  floor: Unicorn int3 -> Python -> resume {floor:7.2f} µs   (an empty hook; a loaded host inflates "
        f"every line alike)",
        f"  ({n:,} cli/sti and {n // 10:,} out traps; cost = (trap run - native run) / traps, best of 3)",
    ])


def _round_trip() -> float:
    """µs per int3 handed to an empty Python UC_HOOK_INTR and resumed: the binding's floor for any trap."""
    import unicorn
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, 0x1000)
    count = 200_000
    code = b"\xb9" + count.to_bytes(4, "little") + b"\xcc\xe2\xfd\xf4"   # mov ecx, n; l: int3; loop l; hlt
    uc.mem_write(0, code)
    uc.hook_add(unicorn.UC_HOOK_INTR, lambda uc, vector, data: None)
    t0 = time.perf_counter()
    uc.emu_start(0, len(code))
    return (time.perf_counter() - t0) / count * 1e6


def _module(name: str, help_text: str) -> tuple:
    """A benchmark that lives in module ``name`` (its ``run(args) -> str`` and ``arguments(parser)``), as a
    BENCHMARKS entry; the module is imported only when that benchmark is asked for."""
    import importlib
    return (lambda args: importlib.import_module(name).run(args), help_text,
            lambda b: importlib.import_module(name).arguments(b))



def _fuzz(args: argparse.Namespace) -> str:
    """Mutated ELF/PE inputs through load, scan and render; count the tracebacks (popek.scanner.fuzz)."""
    from concurrent.futures import ProcessPoolExecutor

    from popek.loaders import read_file
    from popek.scanner import fuzz

    paths = args.seeds or fuzz.default_seeds()
    if not paths:
        raise UsageError("no seed binaries found; give some with --seeds FILE...")
    seeds = [read_file(p, what="--seeds") for p in paths]
    t0 = time.perf_counter()
    total = fuzz.FuzzResult()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for part in pool.map(fuzz.run, [seeds] * args.jobs, [args.examples] * args.jobs,
                             [args.seed] * args.jobs, range(args.jobs), [args.jobs] * args.jobs):
            total.merge(part)
    total.seconds = time.perf_counter() - t0
    return fuzz.render(total, paths, args.jobs)


def _fuzz_arguments(b: argparse.ArgumentParser) -> None:
    from popek import arguments
    arguments.add_campaign(b, 100_000, "mutated inputs")
    b.add_argument("--seeds", nargs="+", metavar="FILE", help="ELF/PE files to mutate (default: vmdetect, "
                                                              "/bin/true, pip's t32.exe and t64.exe)")


# name -> (function, help[, function adding the benchmark's own arguments])
BENCHMARKS = {
    "scan": (_scan, "CPU time of popek scan --strategy linear --format json against objdump -d, per ELF/PE file"),
    "fuzz": (_fuzz, "mutated ELF/PE files through popek scan's load, scan and render; count tracebacks",
             _fuzz_arguments),
    "differential": (_differential, "run generated guests under native and a monitor; count divergences",
                     _differential_arguments),
    "images": _module("popek.experiments.images", "random 4 KiB images (half behind a 256-gate IDT that resumes "
                      "them) under native and a monitor; count how their ends differ"),
    "emulate": (_emulate, "wall time of the pure interpreter (emulate) against native on a compute-bound guest",
                _emulate_arguments),
    "trap": (_trap, "native speed and the cost of one trapped-and-emulated privileged instruction under trap"),
    "bt": _module("popek.monitors.bt_bench", "binary translation: compute-bound ratio to native and emulate, one "
                  "callout, translation speed, bounded cache"),
    "pv": _module("popek.monitors.pv_bench", "paravirtualization: µs per hypercall, monitor entries per ported guest "
                  "under trap, bt and pv, the nanobenchmarks' pv column"),
    "nano": _module("popek.experiments.nanobench", "the Adams & Agesen nanobenchmarks: modelled cycles per iteration "
                    "under every monitor, next to the paper's figures, and whether the model reproduces the paper's "
                    "orderings"),
    "hvm": _module("popek.monitors.hvm.bench", "hardware-assisted virtualization: VM exits by reason and modelled "
                   "cycles per sample guest and nanobenchmark under the kvm and vtx-2005 control sets, against bt"),
    "sun4v": _module("popek.monitors.sun4v.bench", "the sun4v model: µs per fast trap, monitor entries per sample guest "
                     "under trap, bt, pv, hvm and sun4v, the nanobenchmarks' sun4v column, compare's sun4v column "
                     "on ultrasparc-t1"),
}


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (fn, help_text, *arguments) in BENCHMARKS.items():
        b = sub.add_parser(name, help=help_text, description=help_text)
        if name == "scan":
            b.add_argument("paths", nargs="*", metavar="PATH", help="ELF/PE files or directories of them")
            b.add_argument("--fetch", metavar="DIR", help="download large real binaries from Debian into DIR "
                                                          "(apt-get download: " + ", ".join(BENCH_DEBS) + ")")
        for add in arguments:
            add(b)
        b.set_defaults(_bench=fn)


def run(args: argparse.Namespace) -> int:
    emit(args._bench(args))
    return 0
