"""Typed errors. Library code raises these; only popek.cli turns them into a one-line message and exit 2."""


class PopekError(Exception):
    """Base of every error popek reports to a user as one line (never a traceback)."""


class UsageError(PopekError):
    """The command line asks for something that makes no sense."""


class BadInput(PopekError):
    """A file popek was given cannot be used: empty, truncated, lying headers, wrong architecture."""


class UnsupportedFormat(BadInput):
    """Not a format popek reads (or not x86)."""


class TruncatedFile(BadInput):
    """Headers point past the end of the file."""


class WrongArch(BadInput):
    """A well-formed binary for another architecture."""


class SourceError(PopekError):
    """An error in a text popek parses (ISA description, guest assembly), with its position.

    str() gives ``FILE:LINE:COL: message`` (COL omitted when unknown), which editors and tests rely on.
    """

    def __init__(self, message: str, file: str = "<input>", line: int | None = None,
                 column: int | None = None, context: str = ""):
        self.message, self.file, self.line, self.column, self.context = message, file, line, column, context
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.message}"
