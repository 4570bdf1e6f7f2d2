"""Flat code: the file's bytes are the code, byte N sitting at address ``base + N``.

Firmware and boot sectors often mix modes (a 16-bit part, then a 32-bit part), so the caller may cut the
file into regions, each with its own mode, given in address space as ``(start, end, mode)``, end exclusive.
"""
from __future__ import annotations

from popek.errors import BadInput, UsageError
from popek.loaders import ADDRESS_LIMIT, MODES, Image, Region


def load(data: bytes, path: str, sha256: str, *, mode: int | None, base: int = 0,
         regions: list[tuple[int, int, int]] | None = None) -> Image:
    """One region named "raw" covering the file in ``mode``, or one region per spec named "raw@0x<start>"."""
    if base < 0:
        raise UsageError(f"base must not be negative, got {base}")
    if base + len(data) > ADDRESS_LIMIT:
        raise BadInput(f"base 0x{base:x} puts the file's {len(data)} bytes past the top of the 64-bit address "
                         f"space (0x{ADDRESS_LIMIT - 1:x}); the last byte must sit at or below it")
    if regions:
        cut = tuple(_cut(data, base, spec) for spec in sorted(regions))
        for before, after in zip(cut, cut[1:]):
            if after.start < before.end:
                raise UsageError(f"regions {before.name} and {after.name} overlap")
    else:
        if mode not in MODES:
            raise UsageError(f"raw code needs a mode of 16, 32 or 64, got {mode}")
        cut = (Region("raw", base, data, mode),)
    return Image(path=path, format="raw", sha256=sha256, regions=cut, entry_points=(base,))


def _cut(data: bytes, base: int, spec: tuple[int, int, int]) -> Region:
    start, end, mode = spec
    if mode not in MODES:
        raise UsageError(f"region 0x{start:x}-0x{end:x}: mode must be 16, 32 or 64, not {mode}")
    if end <= start:
        raise UsageError(f"region 0x{start:x}-0x{end:x}: end must be greater than start")
    if start < base or end > base + len(data):
        raise BadInput(f"region 0x{start:x}-0x{end:x} lies outside the file, which covers "
                       f"0x{base:x}-0x{base + len(data):x}")
    return Region(f"raw@0x{start:x}", start, data[start - base:end - base], mode)
