"""Layout: statements → a flat image, by passes until every label keeps its address.

Pass 0 lays the program out with a guess for each forward reference (the address of the statement
that uses it, which makes a forward jump look short). Every later pass uses the previous pass's
addresses. Instruction sizes depend on those (short/near jumps, imm8/imm32), so the layout is
repeated until a pass ends with exactly the addresses it started from: then every encoding was made
with final values. Errors that depend on values (a short jump out of range, a value too wide for
.byte) are only reported from that final pass, since an earlier pass may have used a guess.

Should sizes oscillate, passes after ``GROW_ONLY_AFTER`` never let an instruction shrink: a shorter
encoding is padded with NOPs, which makes the layout monotonic and so convergent.
"""
from __future__ import annotations

import os
from typing import Mapping

from popek.asm.encode import EncodeError, encode
from popek.asm.expr import ExprError, Sym, evaluate, first_column, symbols
from popek.asm.parse import Directive, Instruction
from popek.asm.program import ListingLine, Program
from popek.asm.registers import register
from popek.asm.source import Item, Origin, Preprocessor, source_error
from popek.errors import BadInput, SourceError

DEFAULT_ORIGIN = 0x00100000   # DESIGN §3.3: a flat image is loaded here
MAX_PASSES = 16
GROW_ONLY_AFTER = 8
MAX_IMAGE = 256 << 20         # far above the machine's default 32 MiB of RAM; stops `.space 0x7fffffff`
_DATA_SIZES = {"byte": 1, "word": 2, "dword": 4}


class _Deferred(Exception):
    """A value-dependent error: real only if it survives into the final pass."""

    def __init__(self, error: SourceError):
        self.error = error


class _Pass:
    def __init__(self, items: list[Item], number: int, previous: dict[str, int] | None,
                 defines: Mapping[str, int], floor: dict[int, int] | None, origin: int):
        self.items, self.number, self.previous, self.floor = items, number, previous, floor
        self.symbols: dict[str, int] = dict(defines)
        self.defined_at: dict[str, Origin | None] = {name: None for name in defines}
        self.origin = self.address = origin
        self.origin_set = False
        self.mode = 32
        self.out = bytearray()
        self.listing: list[ListingLine] = []
        self.errors: list[SourceError] = []
        self.sizes: dict[int, int] = {}
        self.labels: list[str] = []

    # ---- symbols ---------------------------------------------------------------------------------------
    def lookup(self, sym: Sym) -> int:
        if sym.name in self.symbols:
            return self.symbols[sym.name]
        if self.previous is not None and sym.name in self.previous:
            return self.previous[sym.name]
        if self.previous is None:
            return self.address   # pass 0: guess for a forward reference
        raise ExprError(f"undefined symbol '{sym.name}'", sym.column)

    def define(self, name: str, value: int, origin: Origin, column: int | None) -> None:
        if register(name):
            raise source_error(origin, f"'{name}' is a register name, not a symbol", column)
        if name in self.defined_at:
            first = self.defined_at[name]
            where = f"at {first.file}:{first.line}" if first else "by -D"
            raise source_error(origin, f"'{name}' is already defined {where}", column)
        self.symbols[name] = value
        self.defined_at[name] = origin

    def value(self, expr, origin: Origin) -> int:
        try:
            return evaluate(expr, self.lookup, self.address)
        except ExprError as exc:
            raise _Deferred(source_error(origin, exc.message, exc.column or first_column(expr))) from None

    # ---- the pass --------------------------------------------------------------------------------------
    def run(self) -> None:
        for index, item in enumerate(self.items):
            start = self.address
            for label in item.line.labels:
                self.define(label.name, self.address, item.origin, label.column)
                self.labels.append(label.name)
            st = item.line.statement
            try:
                if isinstance(st, Instruction):
                    data = self.instruction(st, item.origin, index)
                elif isinstance(st, Directive):
                    data = self.directive(st, item.origin)
                else:
                    data = b""
            except _Deferred as d:
                self.errors.append(d.error)
                data = b""
            if not self.out:
                start = self.address   # an origin-setting .org moved the start
            self.emit(data)
            self.listing.append(ListingLine(start, data, item.origin.file, item.origin.line, item.origin.text,
                                            item.origin.macro))

    def room(self, n: int, origin: Origin, column: int) -> int:
        """``n`` bytes of padding, unless that would make the image absurdly large."""
        if self.address + n - self.origin > MAX_IMAGE:
            raise _Deferred(source_error(origin, f"the image would grow past {MAX_IMAGE >> 20} MiB", column))
        return n

    def emit(self, data: bytes) -> None:
        if data:
            self.origin_set = True
        self.out += data
        self.address += len(data)

    def instruction(self, st: Instruction, origin: Origin, index: int) -> bytes:
        try:
            data = encode(st, self.lookup, self.address, self.mode).data
        except EncodeError as exc:
            raise _Deferred(source_error(origin, exc.message, exc.column)) from None
        if self.floor is not None and len(data) < self.floor.get(index, 0):
            data += b"\x90" * (self.floor[index] - len(data))   # grow-only: keep the earlier size
        self.sizes[index] = len(data)
        return data

    def directive(self, st: Directive, origin: Origin) -> bytes:
        name, args = st.name, st.args
        if name == "org":
            target = self.value(args[0], origin)
            if not 0 <= target < 1 << 32:
                raise _Deferred(source_error(origin, f".org {target:#x} is outside the 32-bit address space",
                                             st.column))
            if not self.origin_set:   # nothing emitted yet: this .org is the load address
                for label in self.labels:   # labels above it mark the same (first) byte
                    self.symbols[label] = target
                self.origin = self.address = target
                self.origin_set = True
                return b""
            if target < self.address:
                raise _Deferred(source_error(origin, f".org {target:#x} is behind the current address "
                                                     f"{self.address:#x}", st.column))
            return bytes(self.room(target - self.address, origin, st.column))
        if name == "align":
            n = self.value(args[0], origin)
            fill = self.fill(args, origin)
            if n <= 0:
                raise _Deferred(source_error(origin, f".align needs a positive alignment, not {n}", st.column))
            return bytes([fill]) * (-self.address % n)
        if name in _DATA_SIZES:
            size = _DATA_SIZES[name]
            out = bytearray()
            for expr in args:
                v = self.value(expr, origin)
                if not -(1 << (8 * size - 1)) <= v < (1 << 8 * size):
                    raise _Deferred(source_error(origin, f"value {v:#x} does not fit in .{name}", first_column(expr)))
                out += (v & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            return bytes(out)
        if name in ("ascii", "asciz"):
            return b"".join(s + (b"\0" if name == "asciz" else b"") for s in args)
        if name == "space":
            n = self.value(args[0], origin)
            if n < 0:
                raise _Deferred(source_error(origin, f".space needs a size of at least 0, not {n}", st.column))
            return bytes([self.fill(args, origin)]) * self.room(n, origin, st.column)
        if name == "equ":
            self.define(args[0], self.value(args[1], origin), origin, st.column)
            return b""
        if name in ("code16", "code32"):
            self.mode = 16 if name == "code16" else 32
            return b""
        if name == "unknown_directive":
            raise source_error(origin, f"unknown directive '{args[0]}'", st.column)
        raise source_error(origin, f"'.{name.rstrip('_')}' is not allowed here", st.column)

    def fill(self, args: tuple, origin: Origin) -> int:
        fill = self.value(args[1], origin) if len(args) > 1 else 0
        if not -128 <= fill <= 255:
            raise _Deferred(source_error(origin, f"fill value {fill:#x} is not a byte", first_column(args[1])))
        return fill & 0xFF


def _check_equ_cycles(items: list[Item]) -> None:
    """``.equ a, b`` + ``.equ b, a`` would settle on whatever pass 0 guessed: refuse it up front."""
    deps = {}
    for item in items:
        st = item.line.statement
        if isinstance(st, Directive) and st.name == "equ":
            deps.setdefault(st.args[0], (set(symbols(st.args[1])), item.origin))
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            raise source_error(deps[cycle[0]][1], "circular definition: " + " -> ".join(cycle))
        if name in done or name not in deps:
            return
        for dep in sorted(deps[name][0]):
            visit(dep, path + [name])
        done.add(name)

    for name in deps:
        visit(name, [])


def assemble_items(items: list[Item], name: str = "<input>", defines: Mapping[str, int] | None = None,
                   origin: int = DEFAULT_ORIGIN) -> Program:
    """Lay out preprocessed statements (passes until the addresses are stable)."""
    defines = dict(defines or {})
    _check_equ_cycles(items)
    previous: dict[str, int] | None = None
    floor: dict[int, int] = {}
    for number in range(MAX_PASSES):
        p = _Pass(items, number, previous, defines, floor if number >= GROW_ONLY_AFTER else None, origin)
        p.run()
        for index, size in p.sizes.items():
            floor[index] = max(size, floor.get(index, 0))
        if previous is not None and p.symbols == previous:
            if p.errors:
                raise p.errors[0]
            entry = p.symbols.get("_start", p.symbols.get("start", p.origin))
            return Program(bytes(p.out), p.origin, entry, p.symbols, p.listing, name, number + 1)
        previous = p.symbols
    if p.errors:
        raise p.errors[0]
    raise SourceError(f"label addresses do not settle after {MAX_PASSES} passes", name)


def _defines(defines) -> dict[str, int]:
    """``{"NAME": 1, "BASE": "0x200000"}`` or ``["NAME", "BASE=0x200000"]`` → ``{name: int}``."""
    if defines is None:
        return {}
    if not isinstance(defines, Mapping):
        defines = dict(parse_define(d) for d in defines)
    out = {}
    for key, value in defines.items():
        if value is None or value is True:
            value = 1
        if isinstance(value, str):
            _, value = parse_define(f"{key}={value}")
        out[key] = int(value)
    return out


def parse_define(text: str) -> tuple[str, int]:
    """``NAME`` or ``NAME=VALUE`` (a C-style integer: 12, 0x1f, 0b101, 0o17) → (name, value)."""
    name, _, value = text.partition("=")
    name = name.strip()
    if not name.isidentifier() or register(name):
        raise BadInput(f"-D {text}: '{name}' is not a symbol name")
    if not value.strip():
        return name, 1
    try:
        return name, int(value.strip(), 0)
    except ValueError:
        raise BadInput(f"-D {text}: the value must be an integer") from None


def assemble_text(text: str, name: str = "<input>", defines=None, include_dirs=(),
                  origin: int = DEFAULT_ORIGIN) -> Program:
    """Assemble source text. ``.include`` paths are relative to the current directory, then include_dirs."""
    values = _defines(defines)
    items = Preprocessor(values, include_dirs).run_text(text, name, os.getcwd())
    return assemble_items(items, name, values, origin)


def assemble_file(path, defines=None, include_dirs=(), origin: int = DEFAULT_ORIGIN) -> Program:
    """Assemble a source file; ``.include`` is relative to the including file, then include_dirs."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    values = _defines(defines)
    items = Preprocessor(values, include_dirs).run_file(path, text)
    return assemble_items(items, path, values, origin)
