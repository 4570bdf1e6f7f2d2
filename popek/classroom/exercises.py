"""Exercises with checkers: ``popek exercise list | show N | check N FILE...``.

An exercise is a TOML file in ``popek/classroom/exercises/`` (its number, title, text, what to submit, and
the name and parameters of its checker). The materials it points at (guests, ISA descriptions) are in the
samples folder. A checker runs popek's real machinery on the submission — the theorem checker, ``popek
diff``, the monitors — and returns ``Feedback``: passed or not, and lines that say what is right and what is
wrong and why, never just "no". The solutions, and wrong answers with the feedback they must get, are in
tests/test_exercises.py.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from popek.errors import BadInput, PopekError, UsageError

SAMPLES = Path(__file__).resolve().parent.parent.parent / "samples"


@dataclass(frozen=True)
class Exercise:
    number: int
    title: str
    body: str
    submit: str              # what the student hands in, in words
    checker: str             # a key of CHECKERS
    params: dict

    def render_text(self) -> str:
        return (f"Exercise {self.number}: {self.title}\n{self.body.rstrip()}\n\n"
                f"Submit: {self.submit}.\n")


@dataclass
class Feedback:
    passed: bool = True
    lines: list[str] = field(default_factory=list)

    def wrong(self, line: str) -> None:
        self.passed = False
        self.lines.append(line)

    def right(self, line: str) -> None:
        self.lines.append(line)

    def render_text(self, exercise: Exercise) -> str:
        head = "correct" if self.passed else "not yet"
        return f"exercise {exercise.number}: {head}\n" + "".join(f"  - {line}\n" for line in self.lines)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "feedback": self.lines}


def exercises() -> list[Exercise]:
    found = []
    for item in resources.files("popek.classroom").joinpath("exercises").iterdir():
        if item.name.endswith(".toml"):
            data = tomllib.loads(item.read_text())
            found.append(Exercise(data["number"], data["title"], data["text"]["body"], data["submit"],
                                  data["checker"], data.get("params", {})))
    return sorted(found, key=lambda e: e.number)


def get(number: int) -> Exercise:
    for exercise in exercises():
        if exercise.number == number:
            return exercise
    raise UsageError(f"no exercise {number} (popek exercise list shows them)")


def check(exercise: Exercise, files: list[str], samples: Path = SAMPLES) -> Feedback:
    if not samples.is_dir():
        raise BadInput(f"{samples}: the samples folder is not there (run from a source checkout, or pass --samples)")
    if not files:
        raise UsageError(f"exercise {exercise.number}: give {exercise.submit}")
    for name in files:
        if not Path(name).is_file():
            raise BadInput(f"{name}: no such file")
    return CHECKERS[exercise.checker](exercise, files, samples)


# --- 1: the theorem ------------------------------------------------------------------------------------------
def _check_theorem(exercise: Exercise, files: list[str], samples: Path) -> Feedback:
    from popek.isa import language
    from popek.isa.theorem import check as theorem

    out = Feedback()
    start = language.load(samples / exercise.params["start"])
    model = exercise.params["model"]
    try:
        mine = language.load(files[0])
    except PopekError as exc:
        out.wrong(f"your description does not parse: {exc}")
        return out
    for name, given in start.instructions.items():
        if name not in mine.instructions:
            out.wrong(f"{name} is gone: the machine still has that instruction; change how the hardware "
                      f"treats it, not whether it exists")
            continue
        ours = mine.instructions[name]
        if (ours.sensitive, ours.user_sensitive, ours.reads, ours.writes) != \
                (given.sensitive, given.user_sensitive, given.reads, given.writes):
            out.wrong(f"you changed what {name} does (its sensitivity, or the state it reads and writes): that "
                      f"is the instruction's meaning, not its protection; make the hardware trap it instead")
    if model not in mine.models:
        out.wrong(f"the model {model!r} is gone: Theorem 1 is asked under it")
        return out
    before = {v.instruction.name: v for v in theorem(start, model).verdicts}
    result = theorem(mine, model)
    for v in result.theorem1_violations:
        out.wrong(f"Theorem 1 still fails: {v.instruction.name} is sensitive "
                  f"({v.instruction.sensitive_why or 'it touches ' + ', '.join(sorted(v.instruction.touches))}) "
                  f"and {v.why}")
    if out.passed:
        out.right(f"Theorem 1 holds under {model}: {result.conclusion}")
        for v in result.verdicts:
            old = before.get(v.instruction.name)
            if old is not None and old.breaks_theorem1:
                out.right(f"{v.instruction.name}: {v.why}")
    return out


# --- 2: the leak -----------------------------------------------------------------------------------------------
def _answer_names(files: list[str], isa) -> tuple[list[str], list[str]]:
    """Canonical names in the answer files (words; '#' starts a comment) and the words that are not one.
    A mnemonic that names exactly one canonical instruction (pushfd) is taken as that instruction."""
    aliases: dict[str, set[str]] = {}
    for insn in isa.instructions.values():
        for match in insn.matches:
            for mnemonic in match.mnemonics:
                aliases.setdefault(mnemonic, set()).add(insn.name)
    names, problems = [], []
    for path in files:
        for line in Path(path).read_text(errors="replace").splitlines():
            for word in re.split(r"[\s,;]+", line.split("#", 1)[0].strip().lower()):
                if not word:
                    continue
                if word in isa.instructions:
                    names.append(word)
                elif len(aliases.get(word, ())) == 1:
                    names.append(next(iter(aliases[word])))
                elif word in aliases:
                    problems.append(f"{word!r} names several instructions ({', '.join(sorted(aliases[word]))}): "
                                    f"write the canonical name")
                else:
                    problems.append(f"{word!r} is not an instruction name of the IA-32 description (popek isa ia32)")
    return list(dict.fromkeys(names)), problems


def _check_leak(exercise: Exercise, files: list[str], samples: Path) -> Feedback:
    from popek import api
    from popek.isa import language

    out = Feedback()
    isa = language.bundled()
    names, problems = _answer_names(files, isa)
    for p in problems:
        out.wrong(p)
    if not names and not problems:
        out.wrong("the answer names no instruction")
    p = exercise.params
    guest = api.assemble(samples / p["guest"])
    lo, hi = guest.symbols[p["from"]], guest.symbols[p["to"]]
    report = api.diff(guest, p["monitor"])
    leaked = {b["name"]: b for b in report.blamed if lo <= int(b["address"], 16) < hi}
    model = isa.model("ia32")
    for name in names:
        verdict = isa.verdict(isa.instructions[name], model)
        if name in leaked:
            b = leaked[name]
            out.right(f"{name}: yes -- at {b['address']} it read {b['saw']}; the bare machine gave {b['native']}")
        elif verdict.traps:
            out.wrong(f"{name} is privileged: the deprivileged kernel's {name} traps, and the monitor emulates it "
                      f"against the virtual CPU, so it cannot leak")
        elif verdict.sensitive:
            out.wrong(f"{name} is sensitive-unprivileged, so it could leak, but in this guest it reads the same "
                      f"value under {p['monitor']} as on the bare machine: it is not why the line differs")
        else:
            out.wrong(f"{name} is innocuous here: {verdict.why}")
    missing = [n for n in leaked if n not in names]
    if missing:
        out.wrong(f"{len(missing)} more instruction{'s' * (len(missing) > 1)} between {p['from']} and {p['to']} "
                  f"make{'s' * (len(missing) == 1)} the line differ: compare the fields of the two lines")
    if out.passed:
        out.right(f"that is what `popek diff samples/{p['guest']} --monitor {p['monitor']}` finds")
    return out


CHECKERS: dict[str, Callable[[Exercise, list[str], Path], Feedback]] = {
    "theorem": _check_theorem,
    "leak": _check_leak,
}
