"""popek.asm — the guest assembler: Intel syntax over Keystone, every encoding checked with Capstone.

    from popek.asm import assemble_file
    program = assemble_file("samples/asm/hello.s", defines={"EXIT_CODE": 3})
    program.image, program.origin, program.entry, program.symbols, program.listing_text()

Modules: parse (grammar → statements), source (.include, .macro, .if), assemble (passes, layout),
encode (table / Keystone), table (verified system-instruction encodings), verify (Capstone round trip),
program (the result), command (`popek asm`).
"""
from popek.asm.assemble import DEFAULT_ORIGIN, assemble_file, assemble_text, parse_define
from popek.asm.program import ListingLine, Program

__all__ = ["DEFAULT_ORIGIN", "ListingLine", "Program", "assemble_file", "assemble_text", "parse_define"]
