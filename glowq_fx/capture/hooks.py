"""Input-sharing groups from forward hooks, for any ``nn.Module`` model: the eager fallback.

Linears that receive the very same input tensor object in one forward pass read the same
input: that is the sharing GlowQ exploits, found here without any per-architecture config.
The graph-level discovery of ``passes.grouping`` sees through views and casts too; this
hook-level view covers the linears no captured graph contains.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from glowq_fx.capture.linears import linear_weight
from passes.groups import InputGroup, group_name


class TensorKeys:
    """Keys for tensors by identity that do not keep them alive.

    ``id()`` alone is reused once a tensor is freed, and holding every tensor to keep ids
    unique would hold a whole forward pass of activations; a weak reference tells a live
    tensor from a new one at a recycled address.
    """

    def __init__(self) -> None:
        self._refs: dict[int, tuple[weakref.ref, int]] = {}
        self._issued = 0

    def get(self, t: Tensor) -> int | None:
        entry = self._refs.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def key(self, t: Tensor) -> int:
        k = self.get(t)
        if k is None:
            k = self._issued = self._issued + 1
            self._refs[id(t)] = (weakref.ref(t), k)
        return k


def input_sharing_groups(model: nn.Module, run: Callable[[nn.Module], object], *,
                         some_must_run: bool = True) -> list[InputGroup]:
    """Run ``run(model)`` once and group the linears (``nn.Linear``, transformers ``Conv1D``) by
    the input tensor object they received.

    Raises ``ValueError`` when the model has no linear layers or, with ``some_must_run`` (else no
    groups), none of them ran (``run`` may run a part of the model).
    """
    shapes = {name: linear_weight(m).shape for name, m in model.named_modules() if linear_weight(m) is not None}
    linears = {name: m for name, m in model.named_modules() if name in shapes}
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D layers: nothing to quantize")
    by_input: dict[int, list[str]] = {}
    keys = TensorKeys()

    def hook(name: str):
        def record(_module, args):
            by_input.setdefault(keys.key(args[0]), []).append(name)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    if not by_input and some_must_run:
        raise ValueError("no nn.Linear ran during the forward pass; check the example input")
    inputs_of: dict[str, int] = {}
    for names in by_input.values():
        for n in set(names):
            inputs_of[n] = inputs_of.get(n, 0) + 1
    groups = []
    sets = [[n for n in dict.fromkeys(names) if inputs_of[n] == 1] for names in by_input.values()]
    sets += [[n] for n in linears if inputs_of.get(n, 0) > 1]  # reads several inputs: a group alone
    for names in sets:
        if not names:
            continue
        members = tuple(names)  # a module called twice on one tensor counts once
        ins = {shapes[n][1] for n in members}
        if len(ins) != 1:
            raise ValueError(f"linears {members} read one tensor but disagree on in_features {sorted(ins)}")
        groups.append(InputGroup(group_name(members), members, ins.pop(),
                                 tuple(shapes[n][0] for n in members)))
    return groups
