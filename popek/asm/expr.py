"""Expressions in guest sources: the tree the grammar builds, and the two ways to read it.

``evaluate`` gives a constant (immediates, data, .equ, .if). ``linear`` reads a memory operand as
``sum(coef * register) + displacement`` so that ``[table + ebx*4 + 8]`` and ``[8 + 4*ebx + table]`` come
out the same; the encoder then renders one canonical ``[base + index*scale + disp]`` for Keystone.
Symbols are looked up through a callable, because their values change from pass to pass.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Iterator, Union

from popek.asm.registers import register


class ExprError(Exception):
    """An expression cannot be evaluated; ``column`` points at the culprit when known."""

    def __init__(self, message: str, column: int | None = None):
        super().__init__(message)
        self.message, self.column = message, column


@dataclass(frozen=True, slots=True)
class Num:
    value: int


@dataclass(frozen=True, slots=True)
class Sym:
    name: str
    column: int | None = None


@dataclass(frozen=True, slots=True)
class Here:
    """``$``: the address of the current statement."""


@dataclass(frozen=True, slots=True)
class FpuReg:
    """``st(i)``: kept apart so it reaches Keystone as written."""
    index: "Expr"


@dataclass(frozen=True, slots=True)
class Unary:
    op: str
    x: "Expr"


@dataclass(frozen=True, slots=True)
class Binary:
    op: str
    a: "Expr"
    b: "Expr"


Expr = Union[Num, Sym, Here, FpuReg, Unary, Binary]
Lookup = Callable[[Sym], int]


def _div(a: int, b: int) -> int:
    if b == 0:
        raise ExprError("division by zero")
    q = abs(a) // abs(b)  # C semantics (truncate toward zero), as GNU as does
    return q if (a < 0) == (b < 0) else -q


def _mod(a: int, b: int) -> int:
    return a - b * _div(a, b)


def _shift(a: int, b: int, left: bool) -> int:
    if not 0 <= b < 64:
        raise ExprError(f"shift count {b} out of range")
    return a << b if left else a >> b


BINARY: dict[str, Callable[[int, int], int]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": _div, "%": _mod,
    "<<": lambda a, b: _shift(a, b, True), ">>": lambda a, b: _shift(a, b, False),
    "&": operator.and_, "|": operator.or_, "^": operator.xor,
    "&&": lambda a, b: int(bool(a) and bool(b)), "||": lambda a, b: int(bool(a) or bool(b)),
    "==": lambda a, b: int(a == b), "!=": lambda a, b: int(a != b), "<": lambda a, b: int(a < b),
    "<=": lambda a, b: int(a <= b), ">": lambda a, b: int(a > b), ">=": lambda a, b: int(a >= b),
}
UNARY: dict[str, Callable[[int], int]] = {"-": operator.neg, "~": operator.invert, "!": lambda a: int(not a)}


def evaluate(e: Expr, lookup: Lookup, here: int) -> int:
    """The value of a constant expression. Registers are an error here."""
    if isinstance(e, Num):
        return e.value
    if isinstance(e, Sym):
        if register(e.name):
            raise ExprError(f"register '{e.name}' where a value is expected", e.column)
        return lookup(e)
    if isinstance(e, Here):
        return here
    if isinstance(e, Unary):
        return UNARY[e.op](evaluate(e.x, lookup, here))
    if isinstance(e, Binary):
        return BINARY[e.op](evaluate(e.a, lookup, here), evaluate(e.b, lookup, here))
    raise ExprError("st(i) where a value is expected")


def linear(e: Expr, lookup: Lookup, here: int) -> tuple[dict[str, int], int]:
    """``({register: coefficient}, displacement)`` for an address expression.

    Only ``+``, ``-``, unary ``-`` and multiplication by a constant may touch a register; anything else
    involving one (``ebx << 2``, ``ebx * ecx``) is an error rather than a guess.
    """
    if isinstance(e, Sym) and register(e.name):
        return {register(e.name).name: 1}, 0
    if isinstance(e, Binary) and e.op in "+-":
        ra, ca = linear(e.a, lookup, here)
        rb, cb = linear(e.b, lookup, here)
        sign = 1 if e.op == "+" else -1
        regs = dict(ra)
        for r, k in rb.items():
            regs[r] = regs.get(r, 0) + sign * k
        return {r: k for r, k in regs.items() if k}, ca + sign * cb
    if isinstance(e, Unary) and e.op == "-":
        r, c = linear(e.x, lookup, here)
        return {k: -v for k, v in r.items()}, -c
    if isinstance(e, Binary) and e.op == "*":
        ra, ca = linear(e.a, lookup, here)
        rb, cb = linear(e.b, lookup, here)
        if ra and rb:
            raise ExprError("cannot multiply two registers in an address")
        regs, k = (ra, cb) if ra else (rb, ca)
        return {r: v * k for r, v in regs.items() if v * k}, ca * cb
    if any(register(name) for name in symbols(e)):
        raise ExprError("a register may only be added, subtracted or scaled in an address")
    return {}, evaluate(e, lookup, here)


def symbols(e: Expr) -> Iterator[str]:
    """Every name the expression mentions (registers included)."""
    if isinstance(e, Sym):
        yield e.name
    elif isinstance(e, (Unary, FpuReg)):
        yield from symbols(e.x if isinstance(e, Unary) else e.index)
    elif isinstance(e, Binary):
        yield from symbols(e.a)
        yield from symbols(e.b)


def first_column(e: Expr) -> int | None:
    """Column of the first symbol in ``e``, to point error messages somewhere useful."""
    if isinstance(e, Sym):
        return e.column
    for child in (getattr(e, "a", None), getattr(e, "x", None), getattr(e, "b", None)):
        if child is not None and (col := first_column(child)) is not None:
            return col
    return None
