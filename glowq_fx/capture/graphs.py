"""Capture a model's forward as FX graphs, the way ``glowq_backend`` will see it.

``capture_graphs`` runs the model once under ``torch.compile`` with a recording backend and
returns the captured pieces with the run-time aliases between them: a tensor that one piece
returns and the next one receives is the same producer, so groups are stitched across graph
breaks. The recording backend compiles a function with a fresh code object, so the compile
cache entries it creates die with it: capture leaves nothing behind in Dynamo's cache of the
user's own functions, and changes no global setting.
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
    (with run-time aliases across graph breaks) and the graph-break reasons."""
    pieces: list[CapturedGraph] = []
    produced: dict[int, tuple[int, str]] = {}  # tensor key -> (piece, node) that first held it
    keys = TensorKeys()  # identity without keeping the activations alive

    def record(gm: fx.GraphModule, example_inputs, **_kwargs):
        index = len(pieces)
        piece = CapturedGraph(gm, list(example_inputs))
        pieces.append(piece)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)

        def run_piece(*args):
            for node, value in zip(placeholders, args):
                if isinstance(value, Tensor):
                    earlier = produced.get(keys.get(value))
                    if earlier is not None and earlier[0] != index:
                        piece.aliases[node.name] = earlier
                    else:
                        produced.setdefault(keys.key(value), (index, node.name))
            result = gm(*args)
            values = result if isinstance(result, (tuple, list)) else (result,)
            for node, value in zip(outputs, values):
                if isinstance(value, Tensor) and isinstance(node, fx.Node):
                    produced.setdefault(keys.key(value), (index, node.name))
            return result

        return run_piece

    # a fresh code object per capture: Dynamo caches per code object, so the entries die with it
    entry = types.FunctionType(_call.__code__.replace(), _call.__globals__, "glowq_capture")
    before = _dynamo.break_counters()
    with torch.no_grad():
        torch.compile(entry, backend=record, dynamic=False)(model, batch, run)
    return pieces, _dynamo.new_break_reasons(before)
