"""An oracle independent of popek's classifier: GNU objdump's disassembly (AT&T syntax) mapped to canonical
names by a small table of its own. Tests and `popek bench scan` compare popek's findings against it."""
from __future__ import annotations

import re
import subprocess

_SEG = r"%(?:cs|ds|es|fs|gs|ss)"
_PREFIXES = {"rep", "repz", "repe", "repnz", "repne", "lock", "data16", "data32", "addr16", "addr32", "rex.W",
             "rex", "cs", "ds", "es", "fs", "gs", "ss", "notrack", "bnd"}
_REX = re.compile(r"rex(?:\.[WRXB]+)?")  # objdump names a REX prefix by its bits: rex.WRXB, rex.B
# objdump (AT&T) mnemonic, without size suffix where one exists -> canonical name
_SIMPLE = {
    "sgdt": "sgdt", "sidt": "sidt", "sldt": "sldt", "smsw": "smsw", "str": "str", "pushf": "pushf",
    "popf": "popf", "lar": "lar", "lsl": "lsl", "verr": "verr", "verw": "verw", "lcall": "call_far",
    "ljmp": "jmp_far", "lret": "ret_far", "int": "int", "iret": "iret", "lgdt": "lgdt", "lidt": "lidt",
    "lldt": "lldt", "ltr": "ltr", "lmsw": "lmsw", "clts": "clts", "invlpg": "invlpg", "hlt": "hlt",
    "cli": "cli", "sti": "sti", "in": "in", "out": "out", "ins": "ins", "outs": "outs", "rdmsr": "rdmsr",
    "wrmsr": "wrmsr", "rdtsc": "rdtsc", "rdpmc": "rdpmc", "cpuid": "cpuid", "wbinvd": "wbinvd", "invd": "invd",
}


def objdump_sites(args: list[str]) -> set[tuple[int, str]]:
    """(address, canonical name) for every site in `objdump ARGS` output."""
    out = subprocess.run(["objdump", *args], check=True, capture_output=True, text=True).stdout
    return sites_from_listing(out)


def sites_from_listing(out: str) -> set[tuple[int, str]]:
    sites = set()
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\t[0-9a-f ]+\t(.*)$", line)
        if not m:
            continue
        address, text = int(m.group(1), 16), m.group(2).split("#")[0].strip()
        words = text.split(None, 1)
        while words and (words[0] in _PREFIXES or _REX.fullmatch(words[0])):
            words = words[1].split(None, 1) if len(words) > 1 else []
        if not words:
            continue
        mnemonic, operands = words[0], (words[1] if len(words) > 1 else "")
        name = _canonical(mnemonic, operands)
        if name:
            sites.add((address, name))
    return sites


def _canonical(mnemonic: str, operands: str) -> str | None:
    ops = [o.strip() for o in re.split(r",(?![^(]*\))", operands)] if operands else []
    is_seg = [bool(re.fullmatch(_SEG, o)) for o in ops]
    if mnemonic.startswith("push") and ops and is_seg[0]:
        return "push_seg"
    if mnemonic.startswith("pop") and ops and is_seg[0]:
        return "pop_seg"
    if mnemonic.startswith("mov") and len(ops) == 2:
        if is_seg[0]:
            return "mov_from_seg"
        if is_seg[1]:
            return "mov_to_seg"
        if any(re.fullmatch(r"%cr\d+", o) for o in ops):
            return "mov_cr"
        if any(re.fullmatch(r"%db\d+", o) for o in ops):
            return "mov_dr"
        return None
    if mnemonic in _SIMPLE:
        return _SIMPLE[mnemonic]
    # size-suffixed forms: sgdtl pushfw popfq lretq iretw lcalll insb outsl ...
    for base, name in _SIMPLE.items():
        if re.fullmatch(base + r"[bwlq]", mnemonic) and base not in ("in", "out"):
            return name
    return None
