"""Input-sharing groups and their statistics from forward hooks, for any ``nn.Module`` model.

Linears that receive the very same input tensor object in one forward pass read the same
input: that is the sharing GlowQ exploits, found here without any per-architecture config.
(The graph-level discovery of ``passes.grouping`` sees through views and casts too; this
hook-level view is the eager fallback and the calibration driver.)

Calibration attaches one pre-hook per group, on its first member, so each group's ``S`` is fed
exactly once per batch however many members it has.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from glowq_fx.calibrate import GroupStatistics
from glowq_fx.modules.linear import linear_weight
from passes.grouping import InputGroup, group_name


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


def input_sharing_groups(model: nn.Module, run: Callable[[nn.Module], object]) -> list[InputGroup]:
    """Run ``run(model)`` once and group the linears (``nn.Linear``, transformers ``Conv1D``) by
    the input tensor object they received.

    Raises ``ValueError`` when the model has no linear layers or none of them ran.
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
    if not by_input:
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


def collect_statistics(
    model: nn.Module,
    groups: list[InputGroup],
    batches: Iterable[object],
    run: Callable[[nn.Module, object], object],
    *,
    dtype: str = "float32",
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> GroupStatistics:
    """One ``S`` per group over ``batches``; ``run(model, batch)`` does one forward pass.

    The pre-hook sits on each group's first member, so every group is fed once per batch.
    Padding is excluded when ``batch`` is a mapping with an ``attention_mask``; a group input
    flattened to (tokens, d) gets the mask flattened the same way.
    """
    stats = GroupStatistics(((g.name, g.in_features) for g in groups), dtype=dtype)
    modules = dict(model.named_modules())
    current_mask: list[Tensor | None] = [None]

    def hook(group: InputGroup):
        def feed(_module, args):
            x, mask = args[0], current_mask[0]
            if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
                if mask.numel() != x.shape[:-1].numel():
                    raise ValueError(
                        f"{group.name}: attention_mask has {mask.numel()} tokens but the input has "
                        f"{x.shape[:-1].numel()}; the mask must cover the tokens the linears see"
                    )
                mask = mask.reshape(x.shape[:-1])  # input flattened to (tokens, d), same order
            stats.add_batch(group.name, x.detach(), mask)
        return feed

    handles = [modules[g.members[0]].register_forward_pre_hook(hook(g)) for g in groups]
    try:
        with torch.no_grad():
            for batch in progress(batches):
                current_mask[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return stats
