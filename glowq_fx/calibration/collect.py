"""Collect one ``S`` per group over the calibration batches, through forward pre-hooks.

Calibration attaches one pre-hook per group, on its first member, so each group's ``S`` is fed
exactly once per batch however many members it has.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from glowq_fx.calibration.moments import GroupStatistics
from passes.groups import InputGroup


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
