"""One source line → ``Line`` (labels plus at most one statement), from grammars/asm.lark.

The grammar gives every directive its own alias, so the transformer is one small method per node and
the assembler dispatches on ``Directive.name``. Operands keep the text they came from: a macro
invocation passes those slices on as arguments, and error messages quote them.
"""
from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Union

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from popek.asm.expr import Binary, Expr, ExprError, FpuReg, Here, Num, Sym, Unary


class ParseError(Exception):
    def __init__(self, message: str, column: int | None = None):
        super().__init__(message)
        self.message, self.column = message, column


# ---- the tree ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Value:
    """A register or an immediate (a symbol stands for its value: NASM semantics)."""
    expr: Expr
    text: str


@dataclass(frozen=True, slots=True)
class Memory:
    size: str | None          # byte, word, dword, fword, qword, tbyte, xmmword
    segment: Expr | None
    address: Expr
    text: str


@dataclass(frozen=True, slots=True)
class FarDirect:
    selector: Expr
    offset: Expr
    text: str


@dataclass(frozen=True, slots=True)
class FarIndirect:
    memory: Memory
    text: str


@dataclass(frozen=True, slots=True)
class Target:
    """A branch target with an explicit distance: ``jmp short x`` / ``jmp near x``."""
    expr: Expr
    distance: str
    text: str


@dataclass(frozen=True, slots=True)
class String:
    value: bytes
    text: str


Operand = Union[Value, Memory, FarDirect, FarIndirect, Target, String]


@dataclass(frozen=True, slots=True)
class Instruction:
    prefixes: tuple[str, ...]
    mnemonic: str             # lower case
    operands: tuple[Operand, ...]
    column: int
    name: str                 # the mnemonic as written (macro names are case-sensitive)


@dataclass(frozen=True, slots=True)
class Directive:
    name: str                 # the grammar alias: org, align, byte, word, dword, ascii, equ, macro, ...
    args: tuple
    column: int


@dataclass(frozen=True, slots=True)
class Label:
    name: str
    column: int


@dataclass(frozen=True, slots=True)
class Line:
    labels: tuple[Label, ...]
    statement: Instruction | Directive | None


# ---- literals ------------------------------------------------------------------------------------------

_ESCAPES = {"n": 10, "t": 9, "r": 13, "0": 0, "a": 7, "b": 8, "f": 12, "v": 11, "e": 27,
            "\\": 92, '"': 34, "'": 39}
_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)", re.S)


def unescape(body: str) -> bytes:
    """The bytes of a string or character literal body (without quotes), C/GNU-as escapes."""
    out = bytearray()
    pos = 0
    for m in _ESCAPE_RE.finditer(body):
        out += body[pos:m.start()].encode("utf-8")
        esc = m.group(1)
        if esc[0] == "x":
            out.append(int(esc[1:], 16))
        elif esc[0] in "01234567":
            value = int(esc, 8)
            if value > 255:
                raise ParseError(f"octal escape \\{esc} is larger than a byte")
            out.append(value)
        elif esc in _ESCAPES:
            out.append(_ESCAPES[esc])
        else:
            raise ParseError(f"unknown escape \\{esc}")
        pos = m.end()
    out += body[pos:].encode("utf-8")
    return bytes(out)


def _number(text: str) -> int:
    t = text.lower()
    base = {"0x": 16, "0b": 2, "0o": 8}.get(t[:2], 10)
    return int(t[2:] if base != 10 else t, base)


# ---- transformer ---------------------------------------------------------------------------------------

def _binary(op: str):
    return lambda self, a, b: Binary(op, a, b)


@v_args(inline=True)
class _ToLine(Transformer):
    """Parse tree → dataclasses. Holds the line text to slice operand and macro-argument source from."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def _slice(self, meta) -> str:
        return self.text[meta.start_pos:meta.end_pos].strip()

    # expressions
    def num(self, tok):
        return Num(_number(tok))

    def char(self, tok):
        value = unescape(tok[1:-1])
        if len(value) != 1:
            raise ParseError(f"character literal {tok} is not one byte", tok.column)
        return Num(value[0])

    def sym(self, tok):
        return Sym(str(tok), tok.column)

    def fpureg(self, name, index):
        if name.lower() != "st":
            raise ParseError(f"'{name}(...)' is not an expression (only st(i) takes an index)", name.column)
        return FpuReg(index)

    def here(self):
        return Here()

    add, sub, mul, div, mod = _binary("+"), _binary("-"), _binary("*"), _binary("/"), _binary("%")
    shl, shr, band, bor, bxor = _binary("<<"), _binary(">>"), _binary("&"), _binary("|"), _binary("^")
    land, lor = _binary("&&"), _binary("||")

    def cmp(self, a, op, b):
        return Binary(str(op), a, b)

    def neg(self, x):
        return Unary("-", x)

    def inv(self, x):
        return Unary("~", x)

    def lnot(self, x):
        return Unary("!", x)

    # operands
    @v_args(meta=True)
    def value(self, meta, children):
        return Value(children[0], self._slice(meta))

    def size(self, tok):
        return str(tok).lower()

    def segment(self, expr):
        return ("segment", expr)

    @v_args(meta=True)
    def memory(self, meta, children):
        size = next((c for c in children if isinstance(c, str)), None)
        segment = next((c[1] for c in children if isinstance(c, tuple)), None)
        return Memory(size, segment, children[-1], self._slice(meta))

    @v_args(meta=True)
    def far_direct(self, meta, children):
        return FarDirect(children[0], children[1], self._slice(meta))

    @v_args(meta=True)
    def far_indirect(self, meta, children):
        return FarIndirect(children[0], self._slice(meta))

    @v_args(meta=True)
    def short_target(self, meta, children):
        return Target(children[0], "short", self._slice(meta))

    @v_args(meta=True)
    def near_target(self, meta, children):
        return Target(children[0], "near", self._slice(meta))

    def string(self, tok):
        return String(unescape(tok[1:-1]), str(tok))

    def operands(self, *ops):
        return tuple(ops)

    def prefix(self, tok):
        return str(tok).lower()

    def instruction(self, *children):
        prefixes = tuple(c for c in children if isinstance(c, str) and not isinstance(c, Token))
        name = next(c for c in children if isinstance(c, Token))
        operands = children[-1] if isinstance(children[-1], tuple) else ()
        return Instruction(prefixes, name.lower(), operands, name.column, str(name))

    def label(self, tok):
        return Label(str(tok), tok.column)

    def start(self, *children):
        labels = tuple(c for c in children if isinstance(c, Label))
        rest = [c for c in children if not isinstance(c, Label)]
        return Line(labels, rest[0] if rest else None)

    # directives: the alias is the directive's name; arguments stay in grammar order
    def exprs(self, *exprs):
        return tuple(exprs)

    def strings(self, *toks):
        return tuple(unescape(t[1:-1]) for t in toks)

    @v_args(meta=True)
    def macro_param(self, meta, children):
        default = self.text[children[0].end_pos:meta.end_pos].strip().lstrip("=").strip() \
            if len(children) > 1 else None
        return (str(children[0]), default)

    def __default__(self, data, children, meta):
        if data in _DIRECTIVES:
            args = tuple(str(c) if isinstance(c, Token) else c for c in children)
            if data in ("byte", "word", "dword", "ascii", "asciz"):
                args = args[0]
            if data == "include":
                args = (unescape(args[0][1:-1]).decode("utf-8", "replace"),)
            return Directive(data, args, meta.column if not meta.empty else 1)
        return super().__default__(data, children, meta)


_DIRECTIVES = frozenset("org align byte word dword ascii asciz space equ include macro endm if_ ifdef ifndef "
                        "else_ endif code16 code32 global_ unknown_directive".split())


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = (importlib.resources.files("popek.grammars") / "asm.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=False)


# Known-bad snippets → a readable message (Lark's match_examples); tests/test_asm.py loops over this table.
PARSE_ERRORS: dict[str, list[str]] = {
    "missing ']'": ["mov eax, [ebx", "mov eax, [ebx + 4", "lgdt [gdt"],
    "missing operand after ','": ["mov eax,", "add eax, ebx,", ".byte 1,"],
    "incomplete expression": ["mov eax, 1 +", ".byte 1 <<", ".org (1"],
    "a label is a name followed by ':'": ["1abc: nop", "2: nop"],
}


def _describe(exc: UnexpectedInput, text: str) -> str:
    if isinstance(exc, UnexpectedCharacters):
        return f"unexpected character {text[exc.pos_in_stream]!r}"
    if isinstance(exc, UnexpectedToken) and exc.token.type == "ANYTHING":
        # the contextual lexer fell back to the catch-all terminal of unknown directives
        return f"unexpected character {str(exc.token)[0]!r}"
    label = exc.match_examples(_parser().parse, PARSE_ERRORS, use_accepts=True)
    if label:
        return label
    if isinstance(exc, UnexpectedToken):
        if exc.token.type == "$END":
            return "unexpected end of line"
        return f"unexpected {str(exc.token)!r}"
    return "syntax error"


def parse_line(text: str) -> Line:
    """Parse one line (no newline). Raises ParseError with a 1-based column."""
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as exc:
        column = getattr(exc, "column", None)
        raise ParseError(_describe(exc, text), column if isinstance(column, int) and column > 0 else None) \
            from None
    try:
        return _ToLine(text).transform(tree)
    except VisitError as exc:  # Lark wraps what a callback raised: report the original
        orig = exc.orig_exc
        if isinstance(orig, (ParseError, ExprError)):
            raise ParseError(orig.message, orig.column) from None
        raise
