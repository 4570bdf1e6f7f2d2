"""popek scan on real third-party code: GRUB's i386-pc modules (32-bit ELF objects from Debian's grub-pc-bin).

The package is fetched by .ci/run into tests/.debs (apt-get download); without it the test skips.
For every module, every site objdump -d shows is a popek finding; the only extra findings lie inside
STT_OBJECT symbols of executable sections (GRUB's real-mode trampolines), which objdump -d prints as data
and popek, sweeping every executable byte, decodes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from popek.cli import main
from popek.experiments.objdump_oracle import objdump_sites

DEBS = Path(__file__).parent / ".debs"
GRUB = DEBS / "grub-pc-bin" / "usr" / "lib" / "grub" / "i386-pc"

pytestmark = [
    pytest.mark.skipif(not GRUB.is_dir(), reason="grub-pc-bin not fetched (run .ci/run, or apt-get download "
                                                 "grub-pc-bin and dpkg-deb -x it into tests/.debs/grub-pc-bin)"),
    pytest.mark.skipif(not shutil.which("objdump"), reason="objdump not installed"),
]


def _object_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges objdump -d shows as data: STT_OBJECT symbols, up to the next symbol when their size is 0."""
    with path.open("rb") as fh:
        elf = ELFFile(fh)
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            return []
        symbols = [s for s in symtab.iter_symbols() if isinstance(s["st_shndx"], int)]
        ranges = []
        for s in symbols:
            if s["st_info"]["type"] != "STT_OBJECT":
                continue
            lo, section = s["st_value"], s["st_shndx"]
            hi = lo + s["st_size"] if s["st_size"] else min(
                [t["st_value"] for t in symbols if t["st_shndx"] == section and t["st_value"] > lo]
                or [elf.get_section(section)["sh_size"]])
            ranges.append((lo, hi))
        return ranges


def test_grub_modules_match_objdump(capsys):
    modules = sorted(GRUB.glob("*.mod"))
    assert len(modules) > 200
    assert main(["scan", "--format", "json", *map(str, modules)]) == 1
    doc = json.loads(capsys.readouterr().out)
    total = 0
    for report in doc["files"]:
        if not report["regions"]:
            continue
        path = Path(report["path"])
        ours = {(int(f["address"], 16), f["name"]) for f in report["findings"]}
        theirs = objdump_sites(["-d", str(path)])
        total += len(theirs)
        assert theirs <= ours, f"{path.name}: popek misses {sorted(theirs - ours)[:5]}"
        objects = _object_ranges(path)
        for address, name in ours - theirs:
            assert any(lo <= address < hi for lo, hi in objects), f"{path.name}: extra {name} at {address:#x}"
    assert total > 900
