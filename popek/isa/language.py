"""Load an ISA description: Lark parses the text, a transformer builds the objects of popek.isa.model,
and a checking pass reports semantic errors. Every error is a SourceError ``FILE:LINE:COL: message`` with
the offending line and a caret.

Statements (see grammars/isa.lark):

``isa NAME "title"``, ``state NAME "meaning"``, ``group NAME "meaning"`` declare what the rest refers to.

``instruction NAME { ... }``:
  ``match MNEMONIC... [opcode XX.. [/N]] [operand sreg] [mode 16 32 64]`` — recognised in Capstone output;
  ``category C`` — the report class (sensitive-unprivileged, privileged, io, extended, innocuous);
  ``privileged yes|no|iopl|conditional ["when"]`` — traps at CPL > 0 on bare hardware;
  ``sensitive KIND... "why"`` — control, behaviour-mode, behaviour-location;
  ``user-sensitive yes|no "why"`` — sensitive even when executed in (virtual) user mode (Theorem 3);
  ``deprivileged trap|silent|unaffected "why"`` — what it does when the guest kernel runs deprivileged;
  ``robin-irvine GROUP "MNEMONIC"`` — its place in Robin & Irvine's list;
  ``reads STATE...``, ``writes STATE...``, ``source "..."``, ``note [MODE] "..."``.

``model NAME [extends BASE] "description" { guest-ring N; virtualizes STATE... "why"; trap INSN... "why";
exit NAME... [when Q] reason NUMBER REASON control CONTROL... "why"; source; note }``.

``exit`` (hardware-assisted models) says how a way out of the guest is reported and what enables it: NAME is
an instruction or one of the events ``exception external-interrupt triple-fault interrupt-window
ept-violation``; ``when`` qualifies it (``read``/``write`` for a register access, or a mnemonic when one
canonical name covers several); ``reason`` is the vendor's number (VT-x basic exit reason, AMD-V exit code,
decimal or 0x-hex) and name; ``control`` the settings of the monitor's control set that decide it
(``always``: unconditional). An instruction with an ``exit`` line traps under the model.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from popek.errors import BadInput, SourceError
from popek.isa.model import (CATEGORIES, DEPRIVILEGED, EXIT_EVENTS, OPERAND_KINDS, PRIVILEGE, SENSITIVITY_KINDS,
                             Exit, IsaDescription, Instruction, Match, Model)

BUNDLED = "ia32"


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = (resources.files("popek.grammars") / "isa.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True)


class _Raise(Exception):
    """A semantic error found while transforming; carries the token or meta that locates it."""

    def __init__(self, message: str, where):
        super().__init__(message)
        self.where = where


def _s(tok: Token) -> str:
    """The text of a STRING token, unquoted and unescaped."""
    return bytes(tok[1:-1], "utf-8").decode("unicode_escape")


def _check(value: str, allowed: tuple[str, ...], what: str, tok) -> str:
    if value not in allowed:
        raise _Raise(f"unknown {what} {value!r} (expected one of: {', '.join(allowed)})", tok)
    return value


def _yes_no(tok: Token) -> bool:
    return _check(str(tok), ("yes", "no"), "answer", tok) == "yes"


@v_args(inline=True)
class _Build(Transformer):
    """Statements become (keyword, value, token) triples; blocks fold them into objects."""

    def summary(self, s):
        return ("summary", _s(s), s)

    def mnemonic(self, tok):
        return _s(tok) if tok.type == "STRING" else str(tok)

    def opcode(self, *toks):
        hexes = [t for t in toks if t.type == "HEXBYTE"]
        reg = [int(t) for t in toks if t.type == "DIGIT"]
        if reg and reg[0] > 7:
            raise _Raise("ModRM reg field /N must be 0-7", toks[-1])
        return ("opcode", (bytes(int(t, 16) for t in hexes), reg[0] if reg else None), toks[0])

    def operand(self, tok):
        return ("operand", _check(str(tok), OPERAND_KINDS, "operand kind", tok), tok)

    def modes(self, *toks):
        return ("modes", frozenset(int(t) for t in toks), toks[0])

    @v_args(inline=False, meta=True)
    def match(self, meta, children):
        mnemonics = tuple(c for c in children if isinstance(c, str))
        fields = {}
        for kw, value, _tok in (c for c in children if isinstance(c, tuple)):
            if kw == "opcode":
                fields["opcode"], fields["reg"] = value
            else:
                fields[{"operand": "operand", "modes": "modes"}[kw]] = value
        return ("match", Match(mnemonics, **fields), meta)

    def category(self, tok):
        return ("category", _check(str(tok), CATEGORIES, "category", tok), tok)

    def privileged(self, tok, when=None):
        return ("privileged", (_check(str(tok), PRIVILEGE, "privilege", tok), _s(when) if when else ""), tok)

    def sensitive(self, *toks):
        kinds = tuple(_check(str(t), SENSITIVITY_KINDS, "sensitivity kind", t) for t in toks[:-1])
        return ("sensitive", (kinds, _s(toks[-1])), toks[0])

    def user_sensitive(self, tok, why):
        return ("user_sensitive", (_yes_no(tok), _s(why)), tok)

    def deprivileged(self, tok, why):
        return ("deprivileged", (_check(str(tok), DEPRIVILEGED, "deprivileged behaviour", tok), _s(why)), tok)

    def member(self, group, mnemonic):
        return ("robin_irvine", (str(group), _s(mnemonic)), group)

    def reads(self, *toks):
        return ("reads", toks, toks[0])

    def writes(self, *toks):
        return ("writes", toks, toks[0])

    def source(self, s):
        return ("source", _s(s), s)

    def note(self, *toks):
        mode = int(toks[0]) if len(toks) == 2 else None
        return ("note", (mode, _s(toks[-1])), toks[0])

    def guest_ring(self, digit, why=None):
        return ("guest_ring", int(digit), digit)

    def virtualizes(self, *toks):
        return ("virtualizes", (toks[:-1], _s(toks[-1])), toks[0])

    def trap(self, *toks):
        return ("trap", (toks[:-1], _s(toks[-1])), toks[0])

    def exit_when(self, tok):
        return str(tok)

    def exit(self, *toks):
        toks = list(toks)
        why = _s(toks.pop())
        names, when = [], None
        while isinstance(toks[0], Token) and toks[0].type == "NAME":
            names.append(toks.pop(0))
        if not isinstance(toks[0], Token):
            when = toks.pop(0)
        number, reason, controls = toks[0], toks[1], toks[2:]
        return ("exit", (names, when, int(number, 0), str(reason), tuple(str(c) for c in controls), why), names[0])

    def isa_decl(self, name, title):
        return ("isa", (str(name), _s(title)), name)

    def state_decl(self, name, meaning):
        return ("state", (str(name), _s(meaning)), name)

    def group_decl(self, name, meaning):
        return ("group", (str(name), _s(meaning)), name)

    def instruction(self, name, *stmts):
        return ("instruction", (name, stmts), name)

    def model(self, name, *rest):
        base = rest[0] if rest and isinstance(rest[0], Token) and rest[0].type == "NAME" else None
        rest = rest[1:] if base is not None else rest
        return ("model", (name, base, _s(rest[0]), rest[1:]), name)

    def start(self, *items):
        return list(items)


_ONCE = {"summary", "category", "privileged", "sensitive", "user_sensitive", "deprivileged", "robin_irvine"}


def _fold_instruction(name: Token, stmts) -> Instruction:
    seen: dict[str, object] = {}
    f: dict = {"name": str(name), "line": name.line}
    matches, sources, notes, reads, writes = [], [], [], [], []
    for kw, value, tok in stmts:
        if kw in _ONCE:
            if kw in seen:
                raise _Raise(f"instruction {name}: '{kw.replace('_', '-')}' given twice", tok)
            seen[kw] = value
        if kw == "match":
            matches.append(value)
        elif kw == "source":
            sources.append(value)
        elif kw == "note":
            notes.append(value)
        elif kw == "reads":
            reads.extend(value)
        elif kw == "writes":
            writes.extend(value)
        elif kw == "privileged":
            f["privileged"], f["privileged_when"] = value
        elif kw == "sensitive":
            f["sensitive"], f["sensitive_why"] = value
        elif kw == "user_sensitive":
            f["user_sensitive"], f["user_sensitive_why"] = value
        elif kw == "deprivileged":
            f["deprivileged"], f["deprivileged_why"] = value
        else:
            f[kw] = value
    for required in ("category", "privileged"):
        if required not in f:
            raise _Raise(f"instruction {name}: missing '{required}'", name)
    f.update(matches=tuple(matches), sources=tuple(sources), notes=tuple(notes),
             reads=tuple(str(t) for t in reads), writes=tuple(str(t) for t in writes))
    insn = Instruction(**f)
    _check_consistent(insn, name)
    return insn


def _check_consistent(insn: Instruction, where) -> None:
    """The description must not contradict itself: a privileged instruction traps when deprivileged, a
    sensitive unprivileged one misbehaves silently, an innocuous one is unaffected."""
    expected = "trap" if insn.is_privileged else ("silent" if insn.sensitive else "unaffected")
    if insn.deprivileged != expected:
        raise _Raise(f"instruction {insn.name}: 'deprivileged {insn.deprivileged}' contradicts "
                     f"'privileged {insn.privileged}'{' and sensitive' if insn.sensitive else ''} "
                     f"(expected 'deprivileged {expected}')", where)
    if insn.category == "sensitive-unprivileged" and (insn.is_privileged or not insn.sensitive):
        raise _Raise(f"instruction {insn.name}: category sensitive-unprivileged needs 'privileged no' "
                     f"and a 'sensitive' statement", where)


def _fold_model(name: Token, base: Token | None, description: str, stmts, models: dict[str, Model]) -> Model:
    if base is not None and str(base) not in models:
        raise _Raise(f"model {name} extends undefined model {str(base)!r}", base)
    if base is not None:
        m = models[str(base)]
        f = dict(guest_ring=m.guest_ring, virtualizes=m.virtualizes, virtualizes_why=m.virtualizes_why,
                 traps=dict(m.traps), sources=m.sources, notes=m.notes, exits=m.exits)
    else:
        f = dict(guest_ring=3, virtualizes=frozenset(), virtualizes_why="", traps={}, sources=(), notes=(),
                 exits=())
    for kw, value, tok in stmts:
        if kw == "guest_ring":
            f["guest_ring"] = value
        elif kw == "virtualizes":
            states, why = value
            f["virtualizes"] = f["virtualizes"] | frozenset(str(s) for s in states)
            f["virtualizes_why"] = why
        elif kw == "trap":
            names, why = value
            f["traps"].update({str(n): why for n in names})
        elif kw == "exit":
            names, when, number, reason, controls, why = value
            f["exits"] = f["exits"] + tuple(Exit(str(n), number, reason, controls, why, when) for n in names)
        elif kw == "source":
            f["sources"] = f["sources"] + (value,)
        elif kw == "note":
            f["notes"] = f["notes"] + (value[1],)
    return Model(name=str(name), description=description, base=str(base) if base else None, line=name.line, **f)


def _assemble(items, path: str) -> IsaDescription:
    header = None
    states: dict[str, str] = {}
    groups: dict[str, str] = {}
    instructions: dict[str, Instruction] = {}
    models: dict[str, Model] = {}
    pending_refs = []  # (kind, name, token) to check once everything is declared
    for kw, value, tok in items:
        if kw == "isa":
            if header is not None:
                raise _Raise("only one 'isa' declaration per file", tok)
            header = value
        elif kw in ("state", "group"):
            table = states if kw == "state" else groups
            name, meaning = value
            if name in table:
                raise _Raise(f"{kw} {name} declared twice", tok)
            table[name] = meaning
        elif kw == "instruction":
            name, stmts = value
            if str(name) in instructions:
                raise _Raise(f"duplicate instruction {name} (first defined on line {instructions[str(name)].line})",
                             name)
            insn = _fold_instruction(name, stmts)
            instructions[insn.name] = insn
            for skw, sval, stok in stmts:
                if skw in ("reads", "writes"):
                    pending_refs += [("state", str(t), t) for t in sval]
                elif skw == "robin_irvine":
                    pending_refs.append(("group", sval[0], stok))
        elif kw == "model":
            name, base, description, stmts = value
            if str(name) in models:
                raise _Raise(f"duplicate model {name}", name)
            models[str(name)] = _fold_model(name, base, description, stmts, models)
            for skw, sval, stok in stmts:
                if skw == "virtualizes":
                    pending_refs += [("state", str(t), t) for t in sval[0]]
                elif skw == "trap":
                    pending_refs += [("instruction", str(t), t) for t in sval[0]]
                elif skw == "exit":
                    pending_refs += [("exit", str(t), t) for t in sval[0]]
    tables = {"state": states, "group": groups, "instruction": instructions,
              "exit": {**instructions, **dict.fromkeys(EXIT_EVENTS)}}
    for kind, name, tok in pending_refs:
        if name not in tables[kind]:
            what = "instruction or exit event" if kind == "exit" else kind
            raise _Raise(f"undefined {what} {name!r}", tok)
    if header is None:
        raise SourceError("missing 'isa NAME \"title\"' declaration", path, 1, 1)
    return IsaDescription(header[0], header[1], path, states, groups, instructions, models)


def _position(where) -> tuple[int | None, int | None]:
    return getattr(where, "line", None), getattr(where, "column", None)


def _context(text: str, line: int | None, column: int | None) -> str:
    if not line:
        return ""
    src = text.splitlines()[line - 1] if line <= len(text.splitlines()) else ""
    return f"{src}\n{' ' * ((column or 1) - 1)}^"


def _syntax_message(exc: UnexpectedInput) -> str:
    if isinstance(exc, UnexpectedCharacters):
        return f"unexpected character {exc.char!r}"
    if isinstance(exc, UnexpectedEOF):
        return "unexpected end of file (a '}' or a statement is missing)"
    if isinstance(exc, UnexpectedToken):
        got = "end of file" if exc.token.type == "$END" else repr(str(exc.token))
        expected = sorted(_pretty(t) for t in exc.expected)[:8]
        return f"unexpected {got}; expected {' or '.join(expected)}"
    return str(exc).splitlines()[0]


def _pretty(terminal: str) -> str:
    names = {"NAME": "a name", "STRING": "a quoted string", "RBRACE": "'}'", "LBRACE": "'{'",
             "HEXBYTE": "a hex byte", "BITS": "16, 32 or 64", "DIGIT": "a digit", "SLASH": "'/'"}
    if terminal in names:
        return names[terminal]
    try:
        return repr(_parser().get_terminal(terminal).pattern.value)
    except (KeyError, AttributeError):
        return terminal


def parse(text: str, path: str = "<input>") -> IsaDescription:
    """Parse a description; raise SourceError ``PATH:LINE:COL: message`` on any error."""
    try:
        tree = _parser().parse(text)
        return _assemble(_Build().transform(tree), path)
    except UnexpectedInput as exc:
        raise SourceError(_syntax_message(exc), path, exc.line, exc.column,
                          _context(text, exc.line, exc.column)) from None
    except VisitError as exc:
        orig = exc.orig_exc
        if not isinstance(orig, _Raise):
            raise orig from None
        line, column = _position(orig.where)
        raise SourceError(str(orig), path, line, column, _context(text, line, column)) from None
    except _Raise as exc:
        line, column = _position(exc.where)
        raise SourceError(str(exc), path, line, column, _context(text, line, column)) from None


def load(path: str | Path | None = None) -> IsaDescription:
    """Load a description file, or the bundled IA-32 description when ``path`` is None."""
    if path is None:
        return bundled()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read ISA description: {exc.strerror if isinstance(exc, OSError) else exc}")
    return parse(text, str(path))


@lru_cache(maxsize=1)
def bundled() -> IsaDescription:
    """The IA-32/x86-64 description shipped inside the package."""
    text = (resources.files("popek.isa") / "data" / f"{BUNDLED}.isa").read_text(encoding="utf-8")
    return parse(text, f"popek/isa/data/{BUNDLED}.isa")
