"""The private Dynamo details glowq-fx reads, behind one small wrapper.

Dynamo reports *why* a graph broke only through its internal counters (``explain`` resets the
whole compile cache, a process-wide side effect we refuse). torch 2.11 counts breaks under
``"graph_break"``, 2.13 under ``"unimplemented"``; both are read. ``tests/passes/test_dynamo.py``
fails loudly if a known break stops showing up here.

A compile that breaks the graph caches compiled code on the code objects of the frames it
entered (a module class's ``forward``), for every later compile to find. Their guards check the
backend by ``id``, and a backend that was freed can have its ``id`` reused: a capture's recording
backend must not leave such entries behind (``compiling_code``, ``forget_code``).
"""
from __future__ import annotations

import re
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


_SOURCE_PART = re.compile(r"_(?:modules|parameters|buffers)\['([^']+)'\]|\[(\d+)\]")


def placeholder_fqn(node) -> str | None:
    """The model attribute a Dynamo graph placeholder stands for, as a dotted name
    (``model.layers.0.self_attn.q_proj.qweight``), or None for a user input.

    Dynamo keeps the source of each graph input in ``node.meta["grapharg"].source``, printed
    like ``L['self']._modules['model']._modules['layers']._modules['0']._buffers['qweight']``.
    """
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name() if callable(source.name) else source.name
    parts = [a or b for a, b in _SOURCE_PART.findall(str(name))]
    if not parts or "._parameters[" not in name and "._buffers[" not in name:
        return None
    return ".".join(parts)


def compiling_code():
    """The code object of the frame Dynamo is compiling now (called from inside a backend), or None."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except (ImportError, AttributeError, AssertionError, IndexError):
        return None
    return getattr(tx, "f_code", None)


def compile_id():
    """The id of the frame compile in progress (a backend's call and the guards built after it
    share it), or None."""
    try:
        from torch._guards import CompileContext

        return CompileContext.current_compile_id()
    except (ImportError, AttributeError):
        return None


def forget_code(code) -> None:
    """Drop Dynamo's compiled entries for ``code`` (later compiles of it recompile)."""
    try:
        from torch._C._dynamo.eval_frame import reset_code
    except ImportError:
        return
    reset_code(code)
