"""The private Dynamo detail glowq-fx reads, behind one small wrapper.

Dynamo reports *why* a graph broke only through its internal counters (``explain`` resets the
whole compile cache, a process-wide side effect we refuse). torch 2.11 counts breaks under
``"graph_break"``, 2.13 under ``"unimplemented"``; both are read. ``tests/test_dynamo_private``
fails loudly if a known break stops showing up here.
"""
from __future__ import annotations

from collections import Counter

_BREAK_COUNTERS = ("graph_break", "unimplemented")


def break_counters() -> Counter:
    """A snapshot of Dynamo's graph-break counters (reason -> count)."""
    from torch._dynamo.utils import counters

    snapshot: Counter = Counter()
    for key in _BREAK_COUNTERS:
        snapshot.update(dict(counters.get(key, {})))
    return snapshot


def new_break_reasons(before: Counter) -> list[str]:
    """Graph-break reasons counted since ``before``, each shortened to its first line and the
    user-code location Dynamo quotes (``File ..., line N, in f, code: ...``)."""
    reasons = []
    for reason, count in (break_counters() - before).items():
        lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
        where = next((line for line in lines if line.startswith("# File") or line.startswith("File ")), "")
        text = lines[0] if lines else str(reason)
        reasons.append(f"{text} ({where.lstrip('# ')})" if where else text)
    return reasons
