"""What a notebook shows of a popek result: one table, as HTML (``_repr_html_``) or a pandas DataFrame.

A result class that fits a table mixes in ``Tabular`` and says what the table is (``table()``: column names
and rows of plain values, the same values its JSON document holds) and, optionally, one line above it
(``caption()``). Jupyter calls ``_repr_html_`` when a result is the last expression of a cell, so a notebook
user sees a table instead of a dataclass dump; ``to_dataframe()`` gives the same table to pandas, which is
an optional extra (``pip install 'popek[notebook]'``).
"""
from __future__ import annotations

import html

from popek.errors import PopekError


class MissingExtra(PopekError):
    """An optional dependency a function needs is not installed."""


class Tabular:
    """Mixin: ``to_dataframe()`` and ``_repr_html_()`` from ``table()`` and ``caption()``."""

    def table(self) -> tuple[list[str], list[list]]:
        raise NotImplementedError

    def caption(self) -> str:
        return ""

    def to_dataframe(self):
        """The table as a ``pandas.DataFrame`` (pandas is the ``notebook`` extra)."""
        try:
            import pandas
        except ModuleNotFoundError:
            raise MissingExtra("to_dataframe() needs pandas: pip install 'popek[notebook]'") from None
        columns, rows = self.table()
        return pandas.DataFrame(rows, columns=columns)

    def _repr_html_(self) -> str:
        columns, rows = self.table()
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                       for row in rows)
        caption = self.caption()
        caption = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        return f'<table class="popek">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
