"""Collect one ``S`` per group through forward pre-hooks, whoever runs the forward passes.

One pre-hook per group, on its first member, so each group's ``S`` is fed exactly once per batch
however many members it has. ``feeding`` attaches the hooks for a caller that runs the model (or
one block of it) itself; ``collect_statistics`` runs whole-model forward passes over the batches.
Padding is excluded when the batch has an ``attention_mask``; a group input flattened to
(tokens, d) gets the mask flattened the same way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from glowq_fx.calibration.moments import GroupStatistics
from passes.groups import InputGroup


def batch_mask(batch: object) -> Tensor | None:
    """The batch's ``attention_mask`` (padding excluded from ``S``), or None."""
    return batch.get("attention_mask") if isinstance(batch, dict) else None


@contextlib.contextmanager
def feeding(model: nn.Module, groups: Iterable[InputGroup],
            stats: GroupStatistics) -> Iterator[Callable[[Tensor | None], None]]:
    """Pre-hooks feeding ``stats[g.name]`` with each group's input while the body runs forwards.

    Yields ``set_mask(mask)``: the attention mask of the batch about to run (None: no padding).
    """
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
        yield lambda mask: current_mask.__setitem__(0, mask)
    finally:
        for h in handles:
            h.remove()


def collect_statistics(
    model: nn.Module,
    groups: list[InputGroup],
    batches: Iterable[object],
    run: Callable[[nn.Module, object], object],
    *,
    dtype: str = "float32",
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> GroupStatistics:
    """One ``S`` per group over ``batches``; ``run(model, batch)`` does one forward pass."""
    stats = GroupStatistics(((g.name, g.in_features) for g in groups), dtype=dtype)
    with feeding(model, groups, stats) as set_mask, torch.no_grad():
        for batch in progress(batches):
            set_mask(batch_mask(batch))
            run(model, batch)
    return stats
