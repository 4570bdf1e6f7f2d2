"""`popek exercise list | show N | check N FILE...`: exercises with checkers (popek.classroom.exercises).

check exits 0 when the answer is right, 1 when it is not yet (the feedback says why), 2 on bad input."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from popek.arguments import existing_directory
from popek.classroom import exercises as ex
from popek.errors import BadInput
from popek.textout import emit


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=existing_directory, default=ex.SAMPLES, help="the samples folder (default: the checkout's)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="the exercises")
    show = sub.add_parser("show", help="an exercise's text")
    show.add_argument("number", type=int, metavar="N")
    show.add_argument("--files", metavar="DIR", type=Path, help="also copy its starting files into DIR")
    check = sub.add_parser("check", help="check an answer")
    check.add_argument("number", type=int, metavar="N")
    check.add_argument("files", nargs="*", metavar="FILE")
    check.add_argument("--format", choices=("text", "json"), default="text")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        emit("".join(f"{e.number:3}  {e.title}  (checker: {e.checker})\n" for e in ex.exercises()))
        return 0
    exercise = ex.get(args.number)
    if args.action == "show":
        emit(exercise.render_text())
        if args.files:
            _copy_start(exercise, args.samples, args.files)
        return 0
    feedback = ex.check(exercise, args.files, args.samples)
    emit(json.dumps(feedback.to_dict(), indent=2) if args.format == "json" else feedback.render_text(exercise))
    return 0 if feedback.passed else 1


def _copy_start(exercise: ex.Exercise, samples: Path, target: Path) -> None:
    sources = [samples / v for k, v in exercise.params.items() if k in ("start", "guest")]
    try:
        target.mkdir(parents=True, exist_ok=True)
        for source in sources:
            shutil.copy(source, target / source.name)
            emit(f"copied {source.name} to {target}")
    except OSError as exc:
        raise BadInput(f"{target}: {exc.strerror or exc}") from None
