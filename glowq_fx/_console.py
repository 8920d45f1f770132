"""What the library shows a person: plain-text tables and progress bars (the CLI prints them)."""
from __future__ import annotations

from collections.abc import Callable, Iterable


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns aligned by width: the first left-aligned, the rest right-aligned (numbers)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def progress_bar(enabled: bool, desc: str, total: int) -> Callable[[Iterable], Iterable]:
    """A function wrapping an iterable in a tqdm bar (a no-op bar when not ``enabled``)."""
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, total=total, disable=not enabled, leave=False)
