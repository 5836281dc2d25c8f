"""Plain-text tables for the CLI's summaries."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def format_table(rows: list[dict], columns: Sequence[str],
                 fmt: Callable[[str, object], str]) -> str:
    """Right-aligned, whitespace-separated text table (one header line, no spaces in cells);
    ``fmt(column, value)`` renders a cell."""
    cells = [list(columns)] + [[fmt(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
                     for r in cells)
