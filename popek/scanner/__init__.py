"""popek.scanner: classify every instruction of x86 binaries in Popek-Goldberg terms."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable

from popek.errors import BadInput, PopekError, UnsupportedFormat
from popek.isa.classify import Classifier
from popek.loaders import Image, iter_files, load, printable
from popek.scanner import engine
from popek.scanner.document import FileReport, RegionInfo, ScanDocument


def scan_image(image: Image, classifier: Classifier, strategy: str = "linear") -> FileReport:
    if strategy == "linear":
        findings, count = [], 0
        for region in image.regions:
            found, n = engine.linear(region, classifier)
            findings += found
            count += n
    else:
        findings, count = engine.recursive(image, classifier)
    findings = _with_idioms(image, findings)
    regions = tuple(RegionInfo(r.name, r.start, r.end, r.mode) for r in image.regions)
    return FileReport(path=image.path, format=image.format, sha256=image.sha256, regions=regions,
                      findings=tuple(findings), instructions=count, warnings=image.warnings,
                      user_mode=image.user_mode)


def _with_idioms(image: Image, findings: list) -> list:
    """Attach VM-detection idioms recognised around the findings (popek.scanner.idioms). A finding decoded out
    of an idiom's signature bytes (the 'xen' of Xen's ud2; "xen"; cpuid, which objdump shows as js/outsb) is
    not an instruction and is dropped; the idiom's finding says why."""
    from popek.scanner.idioms import SIGNATURES, find_idioms

    out = []
    by_region: dict[str, list] = {}
    for f in findings:
        by_region.setdefault(f.region, []).append(f)
    for region in image.regions:
        found = by_region.get(region.name, [])
        if not found:
            continue
        idioms = find_idioms(region.data, region.start, region.mode, [(f.address, f.name) for f in found])
        signature_bytes = {a for site, (name, _) in idioms.items() for a in range(site - SIGNATURES.get(name, 0), site)}
        for f in found:
            if f.address in signature_bytes:
                continue
            if f.address in idioms:
                name, why = idioms[f.address]
                f = replace(f, idiom=name, idiom_why=why)
            out.append(f)
    return out


def scan_paths(paths: Iterable[str], classifier: Classifier, *, strategy: str = "linear", mode: int | None = None,
               base: int = 0, regions=None, raw: bool = False, internal_errors: bool = True) -> ScanDocument:
    """Scan files and directories. A file found inside a directory that is not a binary (a script, a text;
    UnsupportedFormat, or empty) is skipped and listed in ``skipped``; named on the command line it is an
    error. A directory with no binary in it is bad input.

    One bad file never stops a batch: its error is its report, the others are scanned. That holds for a bug
    in popek or a library too (``internal_errors``, on by default): it becomes that file's error, marked as
    an internal error to report, rather than a traceback that loses every other file's result."""
    paths = list(paths)
    named = set(paths)
    reports, skipped = [], []
    for path, error in iter_files(paths):
        if error is None:
            try:
                image = load(path, mode=mode, base=base, regions=regions, raw=raw)
                reports.append(scan_image(image, classifier, strategy))
                continue
            except BadInput as exc:
                error = exc
            except PopekError:
                raise                       # a usage error is the command line's, not this file's
            except Exception as exc:        # noqa: BLE001 - a bug must not cost the batch (see above)
                if not internal_errors:
                    raise
                error = InternalError(exc)
        if path not in named and (isinstance(error, UnsupportedFormat) or str(error) == "empty file"):
            skipped.append(path)
            continue
        reports.append(FileReport(path=path, error=printable(str(error))))
    if not reports:
        what = f"{len(skipped)} file(s), none of them ELF or PE" if skipped else "no files"
        raise BadInput(f"nothing to scan in {', '.join(paths)}: {what}"
                       + ("; give --mode 16|32|64 to scan them as raw code" if skipped else ""))
    return ScanDocument(files=tuple(reports), strategy=strategy, model=classifier.model.name,
                        extended=classifier.extended, skipped=tuple(skipped))


class InternalError(Exception):
    """An unexpected exception while scanning one file, as that file's one-line error."""

    def __init__(self, exc: BaseException):
        where = exc.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        frame = f" at {Path(where.tb_frame.f_code.co_filename).name}:{where.tb_lineno}" if where else ""
        super().__init__(f"internal error (a bug in popek; please report it with this file): "
                         f"{type(exc).__name__}: {exc}{frame}".replace("\n", " "))
