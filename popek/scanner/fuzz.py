"""A mutation fuzzer for the scanner: real ELF/PE seeds, cut and corrupted where their headers are, scanned and
rendered the way `popek scan` does. Every input must end in a report or a PopekError (a one-line error);
anything else is a traceback, counted and grouped by where it was raised.

Mutations hit the structures a loader trusts (the ELF header, program and section header tables; the PE
headers and section table) far more often than code bytes, with values chosen to break arithmetic: 0, all
ones, 2^63, addresses just below 2^64, the file's length. ``run`` is deterministic for a given seed.
"""
from __future__ import annotations

import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from popek.errors import PopekError

# Values that break offset and size arithmetic, for 2-, 4- and 8-byte fields.
_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                0xFFFFF000, 1 << 63, (1 << 64) - 1, (1 << 64) - 0x1000, (1 << 64) - 16)


def structure_spans(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the headers a loader reads (read with the same libraries the loaders use)."""
    spans = [(0, min(len(data), 64))]
    try:
        if data.startswith(b"\x7fELF"):
            import io

            from elftools.elf.elffile import ELFFile
            elf = ELFFile(io.BytesIO(data))
            spans.append((elf["e_phoff"], elf["e_phoff"] + elf["e_phnum"] * elf["e_phentsize"]))
            spans.append((elf["e_shoff"], elf["e_shoff"] + elf["e_shnum"] * elf["e_shentsize"]))
        elif data.startswith(b"MZ"):
            import pefile
            pe = pefile.PE(data=data, fast_load=True)
            start = pe.DOS_HEADER.e_lfanew
            spans.append((start, pe.OPTIONAL_HEADER.get_file_offset() + pe.FILE_HEADER.SizeOfOptionalHeader
                          + 40 * pe.FILE_HEADER.NumberOfSections))
    except Exception:       # noqa: BLE001 - a seed the libraries cannot read is mutated at its start only
        pass
    return [(lo, min(hi, len(data))) for lo, hi in spans if lo < hi <= len(data) + 4096 and lo < len(data)]


def mutate(seed: bytes, spans: list[tuple[int, int]], rng: random.Random) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.15 and len(data) > 1:
            data = data[:rng.randrange(1, len(data))]
            continue
        lo, hi = rng.choice(spans) if roll < 0.9 else (0, len(data))
        hi = min(hi, len(data))
        if hi <= lo:
            continue
        if roll < 0.5:
            data[rng.randrange(lo, hi)] = rng.randrange(256)
        else:
            size = rng.choice((2, 4, 8))
            at = lo + rng.randrange(max(1, (hi - lo) // size)) * size
            value = rng.choice(_INTERESTING + (len(data), len(data) - 1, rng.getrandbits(64)))
            data[at:at + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")[:max(0, len(data) - at)]
    return bytes(data)


@dataclass
class FuzzResult:
    inputs: int = 0
    reports: int = 0                    # scanned, with or without warnings
    errors: Counter = field(default_factory=Counter)        # one-line PopekError, by class
    tracebacks: Counter = field(default_factory=Counter)    # "Type at file:line" -> count
    examples: dict = field(default_factory=dict)            # the first input of each traceback kind
    slowest: tuple[float, int] = (0.0, -1)
    seconds: float = 0.0

    def merge(self, other: "FuzzResult") -> None:
        self.inputs += other.inputs
        self.reports += other.reports
        self.errors.update(other.errors)
        self.tracebacks.update(other.tracebacks)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)
        self.slowest = max(self.slowest, other.slowest)

    @property
    def traceback_count(self) -> int:
        return sum(self.tracebacks.values())


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    return f"{type(exc).__name__} at {Path(last.filename).name}:{last.lineno}" if last else type(exc).__name__


def run_one(data: bytes, classifier, strategy: str, result: FuzzResult, index: int) -> None:
    """Load, scan and render one input as `popek scan` does, and record how it ended."""
    from popek.loaders import load_data
    from popek.scanner import scan_image
    from popek.scanner.document import ScanDocument
    from popek.scanner.render import render

    t0 = time.perf_counter()
    result.inputs += 1
    try:
        report = scan_image(load_data(data, f"mutant{index}"), classifier, strategy)
        doc = ScanDocument(files=(report,), strategy=strategy)
        for fmt in ("json", "text") if index % 16 == 0 else ("json",):
            render(doc, fmt)
        result.reports += 1
    except PopekError as exc:
        message = str(exc)
        if not message or "\n" in message:
            kind = f"{type(exc).__name__} whose message is not one line"
            result.tracebacks[kind] += 1
            result.examples.setdefault(kind, (index, repr(message)[:200]))
        result.errors[type(exc).__name__] += 1
    except Exception as exc:            # noqa: BLE001 - this is what the fuzzer is looking for
        kind = _where(exc)
        result.tracebacks[kind] += 1
        result.examples.setdefault(kind, (index, f"{type(exc).__name__}: {exc}"[:200]))
    elapsed = time.perf_counter() - t0
    if elapsed > result.slowest[0]:
        result.slowest = (elapsed, index)


def strategy_of(index: int, seeds: int) -> str:
    """Every fourth input of each seed is scanned with the recursive strategy, the others linearly."""
    return "recursive" if (index // seeds) % 4 == 3 else "linear"


def run(seeds: list[bytes], examples: int, seed: int = 0, first: int = 0, step: int = 1) -> FuzzResult:
    """Inputs ``first, first + step, ...`` below ``examples``: input i mutates seed i mod len(seeds) with a
    generator seeded by (seed, i), so any input can be rebuilt alone and jobs can split the range."""
    from popek.isa import bundled_classifier

    classifier = bundled_classifier()
    spans = [structure_spans(s) for s in seeds]
    result = FuzzResult()
    t0 = time.perf_counter()
    for i in range(first, examples, step):
        rng = random.Random(f"{seed}:{i}")
        k = i % len(seeds)
        run_one(mutate(seeds[k], spans[k], rng), classifier, strategy_of(i, len(seeds)), result, i)
    result.seconds = time.perf_counter() - t0
    return result


def rebuild(seeds: list[bytes], index: int, seed: int = 0) -> bytes:
    """The exact input ``index`` of a run, to save and replay."""
    k = index % len(seeds)
    return mutate(seeds[k], structure_spans(seeds[k]), random.Random(f"{seed}:{index}"))


def default_seeds() -> list[str]:
    """Real binaries found on this machine: popek's own ELF sample, the system's /bin/true, and the PE32 and
    PE32+ launchers pip ships (distlib's t32.exe and t64.exe, built by MSVC)."""
    import importlib.util
    found = [Path(__file__).resolve().parent.parent.parent / "samples" / "bin" / "vmdetect", Path("/bin/true")]
    spec = importlib.util.find_spec("pip")
    if spec and spec.origin:
        distlib = Path(spec.origin).parent / "_vendor" / "distlib"
        found += [distlib / "t32.exe", distlib / "t64.exe"]
    return [str(p) for p in found if p.is_file()]


def render(result: FuzzResult, seeds: list[str], jobs: int) -> str:
    lines = [f"popek bench fuzz: {result.inputs:,} mutated inputs from {len(seeds)} seeds "
             f"({', '.join(Path(s).name for s in seeds)}), {jobs} job(s), {result.seconds:.0f} s "
             f"({result.inputs / max(result.seconds, 1e-9):.0f} inputs/s)",
             f"  scanned (a report, perhaps with warnings)  {result.reports:8,}",
             f"  one-line errors                            {sum(result.errors.values()):8,}   "
             + ", ".join(f"{k} {v:,}" for k, v in result.errors.most_common()),
             f"  tracebacks                                 {result.traceback_count:8,}",
             f"  slowest input                              {result.slowest[0]:8.2f} s (input {result.slowest[1]})"]
    for kind, count in result.tracebacks.most_common():
        index, message = result.examples.get(kind, (-1, ""))
        lines.append(f"    {count:6,} x {kind}: first at input {index} ({message})")
    return "\n".join(lines)
