"""Collect one ``S`` per group through forward pre-hooks, whoever runs the forward passes.

One pre-hook per group, on its first member, so each group's ``S`` is fed exactly once per batch
however many members it has. ``feeding`` attaches the hooks for a caller that runs the model (or
one block of it) itself; ``collect_statistics`` runs whole-model forward passes over the batches.
Padding is excluded when the batch has an ``attention_mask``; a group input flattened to
(tokens, d) gets the mask flattened the same way. A pass stops at the output head once every
group has its input, so calibration never computes logits (``StopForward``).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from glowq_fx.calibration.moments import GroupStatistics
from passes.groups import InputGroup


def batch_mask(batch: object) -> Tensor | None:
    """The batch's ``attention_mask`` (padding excluded from ``S``), or None."""
    return batch.get("attention_mask") if isinstance(batch, dict) else None


class StopForward(Exception):
    """Raised at the output head once every group has its input: the rest of the forward pass
    (the head's logits, vocabulary x tokens) is not computed."""


def output_module(model: nn.Module) -> nn.Module | None:
    """The model's output head (``get_output_embeddings()``), where a calibration pass may stop."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def feeding(model: nn.Module, groups: Iterable[InputGroup], stats: GroupStatistics, *,
            stop_at: nn.Module | None = None) -> Iterator[Callable[[Tensor | None], None]]:
    """Pre-hooks feeding ``stats[g.name]`` with each group's input, and each experts module's
    statistics (``stats.experts``), while the body runs forwards.

    Yields ``set_mask(mask)``: the attention mask of the batch about to run (None: no padding),
    called before each forward pass. With ``stop_at`` (the output head), a forward pass that
    reaches it after every group was fed raises ``StopForward`` there (for the caller to catch):
    no logits are computed. A group that has not run yet lets the pass go on.
    """
    modules = dict(model.named_modules())
    groups = list(groups)
    current_mask: list[Tensor | None] = [None]
    fed: set[str] = set()

    def hook(group: InputGroup):
        def feed(_module, args):
            fed.add(group.name)
            x, mask = args[0], current_mask[0]
            if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
                if mask.numel() != x.shape[:-1].numel():
                    raise ValueError(
                        f"{group.name}: attention_mask has {mask.numel()} tokens but the input has "
                        f"{x.shape[:-1].numel()}; the mask must cover the tokens the linears see"
                    )
                mask = mask.reshape(x.shape[:-1])  # input flattened to (tokens, d), same order
            stats.note_input(group.name, x)
            stats.add_batch(group.name, x.detach(), mask)
        return feed

    def stop(_module, _args):
        if len(fed) == len(groups) + len(stats.experts):
            raise StopForward

    def set_mask(mask: Tensor | None) -> None:
        current_mask[0] = mask
        fed.clear()

    def expert_hook(name: str, experts):
        def feed(module, args, kwargs):
            fed.add(name)
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
            if first is not None:
                stats.note_input(name, first)
            t0 = time.perf_counter()
            experts.before(module, args, kwargs, current_mask[0])
            stats.time_s += time.perf_counter() - t0
        return feed

    handles = [modules[g.members[0]].register_forward_pre_hook(hook(g)) for g in groups]
    for name, es in stats.experts.items():
        handles.append(modules[name].register_forward_pre_hook(expert_hook(name, es), with_kwargs=True))
        handles.append(modules[name].register_forward_hook(lambda m, args, out, es=es: es.after(m), always_call=True))
    if stop_at is not None:  # registered last: the head's own statistics come first
        handles.append(stop_at.register_forward_pre_hook(stop))
    try:
        yield set_mask
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
    first_position_weight: float = 1.0,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    experts: dict | None = None,
) -> GroupStatistics:
    """One ``S`` per group over ``batches`` (and the statistics of ``experts``, by experts module
    name: ``calibration.experts``); ``run(model, batch)`` does one forward pass; the first position of
    each window counts ``first_position_weight`` times (``GlowQConfig.first_position_weight``)."""
    stats = GroupStatistics(((g.name, g.in_features) for g in groups), dtype=dtype, experts=experts,
                            first_position_weight=first_position_weight)
    with feeding(model, groups, stats, stop_at=output_module(model)) as set_mask, torch.no_grad():
        for batch in progress(batches):
            set_mask(batch_mask(batch))
            try:
                run(model, batch)
            except StopForward:  # every S is fed: the logits are not needed
                pass
    return stats
