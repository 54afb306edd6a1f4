"""Markdown tables for the reports the evaluation, FLOPs, serving and benchmark scripts print.

One function, so that every table has the same shape (`| a | b |` lines, an alignment row)
and a row with the wrong number of cells fails loudly instead of shifting the columns.

    >>> print(markdown_table(["n", "ms"], [[128, "1.5"], [256, "3.1"]], align="rr"))
    | n | ms |
    |---:|---:|
    | 128 | 1.5 |
    | 256 | 3.1 |
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

# Alignment codes -> the alignment row's cell. "l" is Markdown's default (no colon).
_ALIGN = {"l": "---", "r": "---:", "c": ":---:"}


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence],
                   align: str | None = None) -> str:
    """A Markdown table: a header line, an alignment line, one line per row; no final newline.

    Args:
      headers: the column names.
      rows: one sequence of cells per line, as many as `headers`; cells go through `str`.
      align: one letter per column: "l" (left, Markdown's default), "r" (right) or
        "c" (centre); default all "l".
    """
    align = align or "l" * len(headers)
    if len(align) != len(headers) or set(align) - set(_ALIGN):
        raise ValueError(f"align {align!r}: want one of 'l', 'r', 'c' per column "
                         f"({len(headers)} columns)")
    lines = [_line(headers), "|" + "|".join(_ALIGN[a] for a in align) + "|"]
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"table row {i} has {len(row)} cells for {len(headers)} columns")
        lines.append(_line(row))
    return "\n".join(lines)


def _line(cells: Sequence) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
