"""What the assembler produces: the flat image, where it goes, its symbols and a listing."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ListingLine:
    address: int
    data: bytes
    file: str
    line: int
    text: str
    macro: str = ""


@dataclass
class Program:
    image: bytes
    origin: int
    entry: int
    symbols: dict[str, int]
    listing: list[ListingLine] = field(default_factory=list)
    name: str = "<input>"
    passes: int = 0

    @property
    def end(self) -> int:
        return self.origin + len(self.image)

    def listing_text(self, max_bytes_per_line: int = 8, max_lines_per_statement: int = 4) -> str:
        """Address, bytes and source of every line, then the symbol table (long data is cut short)."""
        out = [f"; popek asm: {self.name}  origin {self.origin:#010x}  entry {self.entry:#010x}  "
               f"{len(self.image)} bytes"]
        current = None
        for ln in self.listing:
            if ln.file != current:
                out.append(f"; {ln.file}")
                current = ln.file
            chunks = [ln.data[i:i + max_bytes_per_line] for i in range(0, len(ln.data), max_bytes_per_line)]
            chunks = chunks or [b""]
            mark = "+" if ln.macro else " "
            for k, chunk in enumerate(chunks[:max_lines_per_statement]):
                source = ln.text.rstrip() if k == 0 else ""
                number = f"{ln.line:5}{mark}" if k == 0 else "      "
                out.append(f"{number} {ln.address + k * max_bytes_per_line:08x}  {chunk.hex(' '):<{3 * max_bytes_per_line}} "
                           f"{source}".rstrip())
            if len(chunks) > max_lines_per_statement:
                out.append(f"{'':6} {'':8}  ... {len(ln.data)} bytes in all")
        out.append("")
        out.append("; symbols")
        for name, value in sorted(self.symbols.items(), key=lambda kv: (kv[1], kv[0])):
            out.append(f"{value & 0xFFFFFFFF:08x}  {name}")
        return "\n".join(out) + "\n"
