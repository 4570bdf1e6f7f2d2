"""Sweep strategies: find every described instruction in a loaded image.

- ``linear`` (the default): decode each executable region from its first byte to its last, as ``objdump -d``
  does. Complete and fast (one pass of Capstone's lite decoder); data inside code sections can decode as
  instructions and give false positives.
- ``recursive``: the linear findings, plus a traversal of the control flow from the entry points and
  symbols that marks each finding reachable or not and adds instructions the linear sweep missed because it
  was misaligned by data. Slower; indirect jumps are not followed, so "unreachable" means "not reached by
  direct control flow", not "dead".
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Iterator

from popek.decode import BAD, BYTES_AT, LEGACY_PREFIXES, RECORD, sweep, sweep_records
from popek.isa.classify import Classifier
from popek.loaders import Image, Region
from popek.scanner.document import Finding

STRATEGIES = ("linear", "recursive")
_REX = frozenset(range(0x40, 0x50))

# Control flow, by Capstone mnemonic. A block ends at an unconditional transfer; branches add their target.
_ENDS_BLOCK = frozenset("""jmp ljmp ret retf retfq iret iretd iretq hlt ud2 ud1 ud0 sysret sysretq sysexit
                           int3 .byte""".split())
_BRANCHES = frozenset("""jmp call ja jae jb jbe je jne jg jge jl jle jo jno jp jnp js jns jcxz jecxz jrcxz
                         loop loope loopne""".split())


def _finding(classifier: Classifier, region: Region, address: int, size: int, mnemonic: str, op_str: str,
             entry, reachable: bool | None) -> Finding:
    start = address - region.start
    verdict = classifier.verdicts[entry.name]
    return Finding(address=address, size=size, bytes=region.data[start:start + size],
                   text=f"{mnemonic} {op_str}".strip(), name=entry.name, cls=entry.category,
                   region=region.name, why=verdict.why, mode=region.mode, reachable=reachable,
                   user_sensitive=verdict.user_sensitive)


# Prefix bytes Capstone refuses in front of an instruction and emits as a lone ``.byte`` (LOCK on an
# instruction that cannot be locked): objdump shows them as part of the instruction, and the CPU raises #UD.
_REFUSED = {0xF0: "lock"}
_REFUSED_WHY = {0xF0: "the CPU raises #UD for LOCK on this instruction (objdump shows it as lock {text})"}


def linear(region: Region, classifier: Classifier) -> tuple[list[Finding], int]:
    """Every described instruction in the region, and how many instructions were decoded."""
    data, base, mode = region.data, region.start, region.mode
    lookup, candidates = classifier.lookup_id, classifier.candidate_ids
    prefixes = LEGACY_PREFIXES | (_REX if mode == 64 else frozenset())
    findings = []
    count = 0
    tail: list[int] = []
    # Hot loop: ~3 M instructions for a kernel. Python sees only candidate ids, and most candidates
    # (ordinary MOVs) are rejected on their first byte before any text is decoded.
    for batch in sweep_records(data, base, mode):
        ids, blob = batch.ids, batch.blob
        count += len(ids)
        # Offsets of lone undecodable bytes that may be a refused prefix; the previous batch's last few are
        # kept, as a prefix run may straddle two batches.
        lone = set(tail)
        for i in [i for i, ident in enumerate(ids) if ident == 0 and blob[i * RECORD + BYTES_AT] in _REFUSED]:
            lone.add(batch.address_size(i)[0] - base)
        tail = sorted(lone)[-14:]
        for i in [i for i, ident in enumerate(ids) if ident in candidates]:
            firsts = candidates[ids[i]]
            if firsts is not None:
                first = blob[i * RECORD + BYTES_AT]
                if first not in firsts and first not in prefixes:
                    continue
            address, size = batch.address_size(i)
            mnemonic, op_str = batch.text(i)
            entry = lookup(data, address - base, mode, ids[i], op_str)
            if entry is not None:
                finding = _finding(classifier, region, address, size, mnemonic, op_str, entry, None)
                if address - base - 1 in lone:
                    finding = _with_refused_prefixes(finding, data, base, lone)
                findings.append(finding)
    return findings, count


def _with_refused_prefixes(finding: Finding, data: bytes, base: int, lone: set[int]) -> Finding:
    """The finding starting at its first prefix byte, as objdump prints it, when Capstone refused the prefix
    and decoded only what follows it (each refused byte is a lone ``.byte`` record just before: ``lone``
    holds the offsets of the sweep's one-byte undecodable records)."""
    start = first = finding.address - base
    while first - 1 in lone and data[first - 1] in _REFUSED and start - first < 14:
        first -= 1
    if first == start:
        return finding
    refused = data[first:start]
    names = " ".join(_REFUSED[b] for b in refused)
    why = "; ".join(_REFUSED_WHY[b].format(text=finding.text) for b in dict.fromkeys(refused))
    return replace(finding, address=base + first, size=finding.size + len(refused),
                   bytes=refused + finding.bytes, text=f"{names} {finding.text}", why=f"{finding.why}; {why}")


class Decoded:
    """A region's instructions by start offset, each decoded once. The traversal reaches the same code from
    many blocks (and every call returns into the middle of one); decoding a short run from each new start
    and keeping every instruction of it makes the whole traversal about one decode of each byte."""

    RUN = 32   # instructions decoded from a start not seen yet

    def __init__(self, region: Region):
        self.region = region
        self.at: dict[int, tuple[int, int, str, str]] = {}

    def walk(self, offset: int) -> Iterator[tuple[int, int, str, str]]:
        """``(address, size, mnemonic, op_str)`` from ``offset`` on, as ``sweep`` gives them."""
        region, at = self.region, self.at
        while offset < len(region.data):
            insn = at.get(offset)
            if insn is None:
                for insn in sweep(region.data, region.start, region.mode, offset, self.RUN):
                    at.setdefault(insn[0] - region.start, insn)
                insn = at.get(offset)
                if insn is None:
                    return
            yield insn
            offset += insn[1]


def reachable_starts(image: Image) -> tuple[dict[str, set[int]], dict[str, Decoded]]:
    """Instruction start addresses reached from the entry points and symbols, per region name, and the
    instructions decoded on the way."""
    reached: dict[str, set[int]] = {r.name: set() for r in image.regions}
    decoded = {r.name: Decoded(r) for r in image.regions}
    work = list(image.entry_points) + list(image.symbols)
    seen_blocks: set[tuple[str, int]] = set()
    while work:
        target = work.pop()
        region = _region_at(image.regions, target)
        if region is None or (region.name, target) in seen_blocks:
            continue
        seen_blocks.add((region.name, target))
        starts = reached[region.name]
        for address, size, mnemonic, op_str in decoded[region.name].walk(target - region.start):
            if address in starts and address != target:
                break  # joined a block we already walked
            if mnemonic == BAD:
                break
            starts.add(address)
            if mnemonic in _BRANCHES:
                dest = _immediate(op_str)
                if dest is not None:
                    work.append(dest)
            if mnemonic in _ENDS_BLOCK:
                break
    return reached, decoded


def _immediate(op_str: str) -> int | None:
    try:
        return int(op_str, 0)
    except ValueError:
        return None


def _region_at(regions: Iterable[Region], address: int) -> Region | None:
    for r in regions:
        if r.start <= address < r.end:
            return r
    return None


def recursive(image: Image, classifier: Classifier) -> tuple[list[Finding], int]:
    findings: list[Finding] = []
    total = 0
    reached, decoded = reachable_starts(image)
    for region in image.regions:
        found, count = linear(region, classifier)
        total += count
        starts = reached[region.name]
        seen = {f.address for f in found}
        findings += [replace(f, reachable=f.address in starts) for f in found]
        # Instructions only the traversal decodes (the linear sweep was misaligned by data there).
        for address in sorted(starts - seen):
            off = address - region.start
            a, size, mnemonic, op_str = decoded[region.name].at[off]
            entry = classifier.lookup(region.data, off, region.mode, mnemonic, op_str) if mnemonic != BAD else None
            if entry is not None:
                findings.append(_finding(classifier, region, a, size, mnemonic, op_str, entry, True))
    findings.sort(key=lambda f: (f.region, f.address))
    return findings, total
