"""Capture a model's forward as FX graphs, the way ``glowq_backend`` will see it.

``capture_graphs`` runs the model once under ``torch.compile`` with a recording backend and
returns the captured pieces with the run-time aliases between them: a tensor that one piece
returns and the next one receives is the same producer, so groups are stitched across graph
breaks. The recording backend compiles a function with a fresh code object and fresh globals,
so the compile cache entries and the compiled graphs it creates die with it, and the entries a
graph break leaves on inner frames are dropped after the run: capture leaves nothing behind (no
reference to the model), and changes no global setting.
"""
from __future__ import annotations

import types

import torch
from torch import Tensor, fx, nn

from glowq_fx.capture.hooks import TensorKeys
from glowq_fx.capture.run import Run, run_batch
from passes import _dynamo
from passes.grouping import CapturedGraph


def _call(model: nn.Module, batch: object, run: Run) -> object:
    return run(model, batch)


def capture_graphs(model: nn.Module, batch: object, run: Run = run_batch) -> tuple[list[CapturedGraph], list[str]]:
    """Run ``run(model, batch)`` once under ``torch.compile`` and return the captured pieces
    (with run-time aliases across graph breaks) and the graph-break reasons.

    Dynamo keeps every backend it was given, and the functions a backend returned, for the life of
    the process (its backend registry, the compiled code's globals): the ones made here reach the
    captured graphs (and through them the model's parameters) only through ``live``, which is
    emptied before returning, so nothing of the model outlives the caller's references.
    """
    pieces: list[CapturedGraph] = []
    live = {"pieces": pieces, "produced": {}, "keys": TensorKeys()}  # produced: tensor key -> (piece, node)
    compiled_codes = []  # the frames compiled here: their cache entries are dropped after the run
    entry_compiles = set()  # Dynamo's compile ids of the entry frame (its guards are not built)

    def record(gm: fx.GraphModule, example_inputs, **_kwargs):
        code = _dynamo.compiling_code()
        if code is not None:
            compiled_codes.append(code)
            if code is entry.__code__:
                entry_compiles.add(_dynamo.compile_id())
        index = len(live["pieces"])
        live["pieces"].append(CapturedGraph(gm, list(example_inputs)))
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
        outputs = [n.name if isinstance(n, fx.Node) else None
                   for n in (outputs if isinstance(outputs, (tuple, list)) else (outputs,))]

        def run_piece(*args):
            piece, produced, keys = live["pieces"][index], live["produced"], live["keys"]
            for name, value in zip(placeholders, args):
                if isinstance(value, Tensor):
                    earlier = produced.get(keys.get(value))
                    if earlier is not None and earlier[0] != index:
                        piece.aliases[name] = earlier
                    else:
                        produced.setdefault(keys.key(value), (index, name))
            result = piece.gm(*args)
            values = result if isinstance(result, (tuple, list)) else (result,)
            for name, value in zip(outputs, values):
                if isinstance(value, Tensor) and name is not None:
                    produced.setdefault(keys.key(value), (index, name))
            return result

        return run_piece

    # a fresh code object per capture (Dynamo caches per code object) and fresh globals (Dynamo
    # stores each compiled graph as a global of the captured function)
    entry = types.FunctionType(_call.__code__.replace(), dict(_call.__globals__), "glowq_capture")

    def no_guards_on_entry(guards):
        # the entry is called once, so its guards are never checked; torch never frees a guard tree
        # (not even on torch._dynamo.reset), and this one has a guard per parameter: about 0.7 MiB per
        # Llama layer for the life of the process. Inner frames (graph breaks) keep theirs: they tell
        # one layer's call from the next.
        return [entry_compiles.isdisjoint({_dynamo.compile_id()} - {None})] * len(guards)

    before = _dynamo.break_counters()
    try:
        with torch.no_grad():
            torch.compile(entry, backend=record, dynamic=False,
                          options={"guard_filter_fn": no_guards_on_entry})(model, batch, run)
    finally:
        live.clear()
        # a graph break leaves compiled entries on the inner frames' code (a module class's forward),
        # which a later compile could take for its own once this backend's id is reused
        for code in {id(c): c for c in compiled_codes}.values():
            _dynamo.forget_code(code)
    return pieces, _dynamo.new_break_reasons(before)
