"""Plain-text tables for reports and the CLI."""
from __future__ import annotations


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns aligned by width: the first left-aligned, the rest right-aligned (numbers)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
