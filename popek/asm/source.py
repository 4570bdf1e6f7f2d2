"""Source text → a flat list of parsed statements: ``.include``, ``.macro`` and conditional assembly.

This runs once, before any address is known, so ``.if`` can only test what is known that early: ``-D``
defines and ``.equ`` constants defined above it (not labels: their addresses come later). ``.ifdef`` sees
defines, ``.equ`` names and labels defined above it. Macro bodies are kept as raw text and parsed after
substitution, because ``\\arg`` may stand anywhere, even for a mnemonic.

Every statement carries an ``Origin``. For lines coming out of a macro, the origin is the *invocation*
(where a wrong argument was written) and the message names the macro and the body line.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Callable, Iterable

from popek.asm.expr import ExprError, Here, Sym, evaluate
from popek.asm.parse import Directive, Instruction, Line, ParseError, parse_line
from popek.errors import SourceError

MAX_MACRO_DEPTH = 64  # deeper than any sane guest; catches a macro that invokes itself


@dataclass(frozen=True, slots=True)
class Origin:
    file: str
    line: int
    text: str            # the line as assembled, after macro substitution
    macro: str = ""      # e.g. "macro outb, line 2" for lines out of an expansion


@dataclass(frozen=True, slots=True)
class Item:
    origin: Origin
    line: Line


def source_error(origin: Origin, message: str, column: int | None = None) -> SourceError:
    """``FILE:LINE[:COL]: message: source line`` (the column is dropped for macro lines: it would point
    into the body, not into the invocation the location names)."""
    if origin.macro:
        message += f" (in {origin.macro})"
        column = None
    text = origin.text.strip()
    return SourceError(f"{message}: {text}" if text else message, origin.file, origin.line, column,
                       context=origin.text)


@dataclass
class _Macro:
    name: str
    params: list[tuple[str, str | None]]
    origin: Origin
    body: list[str] = field(default_factory=list)


@dataclass
class _Cond:
    active: bool       # this branch is being assembled (parents included)
    taken: bool        # some branch was (or must never be) taken
    origin: Origin
    seen_else: bool = False


_DIRECTIVE_WORD = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\s*:\s*)*(\.[A-Za-z_]\w*)")
_MACRO_ARG = re.compile(r"\\(@|\(\)|[A-Za-z_]\w*)")


def _directive_word(text: str) -> str:
    m = _DIRECTIVE_WORD.match(text)
    return m.group(1).lower() if m else ""


class Preprocessor:
    def __init__(self, defines: dict[str, int] | None = None, include_dirs: Iterable[str] = ()):
        self.consts: dict[str, int] = dict(defines or {})   # known before layout: what .if may read
        self.defined: set[str] = set(self.consts)           # what .ifdef sees
        self.labels: set[str] = set()
        self.include_dirs = [str(d) for d in include_dirs]
        self.macros: dict[str, _Macro] = {}
        self.expansions = 0
        self.depth = 0
        self.includes: list[str] = []
        self.conds: list[_Cond] = []
        self.items: list[Item] = []

    # ---- entry points --------------------------------------------------------------------------------
    def run_text(self, text: str, name: str, directory: str) -> list[Item]:
        self._unit(enumerate(text.splitlines(), 1), name, directory, None)
        return self.items

    def run_file(self, path: str, text: str) -> list[Item]:
        self.includes.append(os.path.realpath(path))
        self._unit(enumerate(text.splitlines(), 1), path, os.path.dirname(os.path.abspath(path)), None)
        self.includes.pop()
        return self.items

    # ---- one file or one macro expansion -------------------------------------------------------------
    def _unit(self, lines, file: str, directory: str, macro: Callable[[int], str] | None,
              at: int | None = None) -> None:
        depth0 = len(self.conds)
        collecting: _Macro | None = None
        for number, text in lines:
            origin = Origin(file, at if at is not None else number, text, macro(number) if macro else "")
            word = _directive_word(text)
            if collecting is not None:
                if word == ".endm":
                    self.macros[collecting.name] = collecting
                    collecting = None
                elif word == ".macro":
                    raise source_error(origin, "a .macro cannot be defined inside another .macro")
                else:
                    collecting.body.append(text)
                self._listed(origin)
                continue
            if not self._active():
                self._skip(word, origin, depth0)
                if word in (".else", ".endif") and self._active():
                    self._listed(origin)
                continue
            try:
                line = parse_line(text)
            except ParseError as exc:
                raise source_error(origin, exc.message, exc.column) from None
            collecting = self._statement(line, origin, directory, depth0)
        if collecting is not None:
            raise source_error(collecting.origin, f"unterminated .macro '{collecting.name}' (no .endm)")
        if len(self.conds) > depth0:
            raise source_error(self.conds[-1].origin, "unterminated conditional (no .endif)")

    def _statement(self, line: Line, origin: Origin, directory: str, depth0: int) -> _Macro | None:
        st = line.statement
        self.labels.update(label.name for label in line.labels)
        self.defined.update(label.name for label in line.labels)
        if isinstance(st, Instruction) and st.name in self.macros and not st.prefixes:
            self._listed(origin, line)
            self._expand(self.macros[st.name], st, origin, directory)
            return None
        if not isinstance(st, Directive):
            self.items.append(Item(origin, line))
            return None
        name = st.name
        if name in ("if_", "ifdef", "ifndef", "else_", "endif", "macro", "include"):
            self._listed(origin, line)   # consumed here, still shown in the listing (labels kept)
        if name in ("if_", "ifdef", "ifndef", "else_", "endif"):
            self._conditional(st, origin, depth0)
        elif name == "macro":
            macro_name, *params = st.args
            if macro_name.lower() in _RESERVED:
                raise source_error(origin, f"'{macro_name}' cannot be a macro name", st.column)
            return _Macro(macro_name, list(params), origin)
        elif name == "endm":
            raise source_error(origin, ".endm without .macro", st.column)
        elif name == "include":
            self._include(st.args[0], origin, directory)
        else:
            if name == "equ":
                self._constant(st.args[0], st.args[1])
            if name != "global_":  # .global is accepted for GNU as compatibility and means nothing here
                self.items.append(Item(origin, line))
        return None

    def _listed(self, origin: Origin, line: Line | None = None) -> None:
        """A line the preprocessor consumed: no statement left, but its labels and listing line stay."""
        self.items.append(Item(origin, Line(line.labels if line else (), None)))

    # ---- conditional assembly ------------------------------------------------------------------------
    def _active(self) -> bool:
        return not self.conds or self.conds[-1].active

    def _conditional(self, st: Directive, origin: Origin, depth0: int) -> None:
        if st.name == "if_":
            self._push(bool(self._value(st.args[0], origin)), origin)
        elif st.name in ("ifdef", "ifndef"):
            self._push((st.args[0] in self.defined) == (st.name == "ifdef"), origin)
        else:
            self._else_endif(st.name, origin, depth0)

    def _skip(self, word: str, origin: Origin, depth0: int) -> None:
        """Inside a false branch only the nesting of conditionals matters (the text is not parsed)."""
        if word in (".if", ".ifdef", ".ifndef"):
            self.conds.append(_Cond(False, True, origin))
        elif word in (".else", ".endif"):
            self._else_endif(word[1:] + ("_" if word == ".else" else ""), origin, depth0)

    def _push(self, value: bool, origin: Origin) -> None:
        self.conds.append(_Cond(value, value, origin))

    def _else_endif(self, name: str, origin: Origin, depth0: int) -> None:
        if len(self.conds) <= depth0:
            raise source_error(origin, f".{name.rstrip('_')} without .if")
        top = self.conds[-1]
        if name == "endif":
            self.conds.pop()
            return
        if top.seen_else:
            raise source_error(origin, "second .else for the same .if")
        parent_active = len(self.conds) < 2 or self.conds[-2].active
        top.active, top.taken, top.seen_else = parent_active and not top.taken, True, True

    def _value(self, expr, origin: Origin) -> int:
        def lookup(sym: Sym) -> int:
            if sym.name in self.consts:
                return self.consts[sym.name]
            if sym.name in self.labels:
                raise ExprError(f"'{sym.name}' is a label; .if is decided before addresses are known",
                                sym.column)
            if sym.name in self.defined:
                raise ExprError(f"'{sym.name}' is not a constant known at this point", sym.column)
            raise ExprError(f"'{sym.name}' is not defined (define it with .equ or -D {sym.name}=VALUE)",
                            sym.column)
        try:
            if any(isinstance(e, Here) for e in _walk(expr)):
                raise ExprError("'$' has no value in .if")
            return evaluate(expr, lookup, 0)
        except ExprError as exc:
            raise source_error(origin, exc.message, exc.column) from None

    def _constant(self, name: str, expr) -> None:
        """Remember an .equ for later .if tests when its value is already known (else only its name)."""
        self.defined.add(name)
        try:
            self.consts[name] = evaluate(expr, lambda s: self.consts[s.name], 0)
        except (KeyError, ExprError):
            self.consts.pop(name, None)

    # ---- macros and includes -------------------------------------------------------------------------
    def _expand(self, macro: _Macro, call: Instruction, origin: Origin, directory: str) -> None:
        args = [op.text for op in call.operands]
        if len(args) > len(macro.params):
            raise source_error(origin, f"macro '{macro.name}' takes {len(macro.params)} argument(s), "
                                       f"got {len(args)}", call.column)
        values = {}
        for (param, default), arg in zip_longest(macro.params, args):
            if arg is None and default is None:
                raise source_error(origin, f"macro '{macro.name}' needs argument '{param}'", call.column)
            values[param] = arg if arg is not None else default
        if self.depth >= MAX_MACRO_DEPTH:
            raise source_error(origin, f"macros nested more than {MAX_MACRO_DEPTH} deep "
                                       f"(does '{macro.name}' invoke itself?)")
        self.expansions += 1
        unique = str(self.expansions)

        def substitute(m: re.Match) -> str:
            key = m.group(1)
            if key == "@":
                return unique
            if key == "()":
                return ""
            return values.get(key, m.group(0))  # not a parameter: leave it (e.g. "\n" in a string)

        body = [(i, _MACRO_ARG.sub(substitute, text)) for i, text in enumerate(macro.body, 1)]
        self.depth += 1
        outer = origin.macro
        where = (lambda i: f"macro {macro.name}, line {i}" + (f"; {outer}" if outer else ""))
        self._unit(body, origin.file, directory, where, at=origin.line)
        self.depth -= 1

    def _include(self, name: str, origin: Origin, directory: str) -> None:
        candidates = [os.path.join(directory, name)] + [os.path.join(d, name) for d in self.include_dirs]
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path == candidates[0] and not os.path.isabs(name) and not origin.file.startswith("<"):
            # name it as the user would: relative to how the including file was named
            path = os.path.normpath(os.path.join(os.path.dirname(origin.file), name))
        if path is None:
            raise source_error(origin, f"cannot find include file '{name}' (looked in "
                                       f"{', '.join(os.path.dirname(c) or '.' for c in candidates)})")
        real = os.path.realpath(path)
        if real in self.includes:
            chain = " -> ".join(os.path.basename(p) for p in self.includes[self.includes.index(real):])
            raise source_error(origin, f"include loop: {chain} -> {os.path.basename(real)}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise source_error(origin, f"cannot read include file '{name}': {exc}") from None
        self.includes.append(real)
        self._unit(enumerate(text.splitlines(), 1), path, os.path.dirname(os.path.abspath(path)), None)
        self.includes.pop()


def _walk(e):
    yield e
    for child in (getattr(e, "a", None), getattr(e, "b", None), getattr(e, "x", None)):
        if child is not None:
            yield from _walk(child)


# Directive-like words and prefixes a macro may not shadow.
_RESERVED = frozenset({"rep", "repe", "repz", "repne", "repnz", "lock"})
