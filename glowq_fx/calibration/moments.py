"""Streaming input second moments, one per input-sharing group.

GlowQ whitens a group's stacked error with ``S = E[x x^T]`` of the input that all its members
read, so ``S`` is collected once per group (fed once per batch, not once per member). Only
the running sum ``sum x x^T`` (d_in x d_in) and the token count are kept: activations are never
stored, memory is O(d_in^2) per group.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from glowq_fx._checks import all_finite

_STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SecondMoment:
    """Uncentered second moment ``S = sum_t x_t x_t^T / N`` of one group's input.

    Args:
        d_in: feature size of the input (the members' ``in_features``).
        name: the group's name, used in every error message.
        dtype: accumulation dtype, ``torch.float32`` or ``torch.float64``.

    The sum lives on the device of the first batch (the activations' device).
    """

    def __init__(self, d_in: int, name: str = "group", dtype: torch.dtype = torch.float32,
                 first_position_weight: float = 1.0):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name}: accumulate S in float32 or float64, got {dtype}")
        self.d_in = d_in
        self.name = name
        self.dtype = dtype
        self.first_position_weight = first_position_weight
        self._sum: Tensor | None = None
        self.n_tokens = 0
        self.n_batches = 0

    def add_batch(self, x: Tensor, attention_mask: Tensor | None = None) -> None:
        """Accumulate one batch.

        Args:
            x: activations (..., d_in), any float dtype.
            attention_mask: optional (...) matching ``x.shape[:-1]``; tokens where it is 0 or
                False (padding) are excluded.
        """
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"{self.name}: activations have {x.shape[-1]} features, the group expects {self.d_in}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: activations must be floating point, got {x.dtype}")
        if self.first_position_weight != 1:
            x = self._first_position_weighted(x, attention_mask)
        tokens = x.reshape(-1, self.d_in)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"{self.name}: attention_mask shape {tuple(attention_mask.shape)} does not match "
                    f"the activations' token shape {tuple(x.shape[:-1])}"
                )
            tokens = tokens[attention_mask.reshape(-1).to(device=x.device).bool()]
        if self._sum is None:
            self._sum = torch.zeros(self.d_in, self.d_in, dtype=self.dtype, device=x.device)
        elif x.device != self._sum.device:
            raise ValueError(
                f"{self.name}: batch on {x.device} but S accumulates on {self._sum.device}; "
                "keep a group's input on one device"
            )
        t = tokens.to(self.dtype)
        if not all_finite(t):
            raise ValueError(
                f"{self.name}: activations contain NaN or Inf in calibration batch {self.n_batches}; "
                "check the model in this dtype (try float32) or the calibration data"
            )
        self._sum.addmm_(t.T, t)
        self.n_tokens += t.shape[0]
        self.n_batches += 1

    def _first_position_weighted(self, x: Tensor, attention_mask: Tensor | None) -> Tensor:
        """``x`` with each sequence's first (unmasked) position scaled by ``sqrt(c)``, so that it
        counts ``c = first_position_weight`` times in ``sum_t x_t x_t^T`` (``n_tokens`` still counts
        it once: a uniform scale of ``S``, which neither GPTQ nor the whitened solve depends on)."""
        if x.dim() < 3:
            raise ValueError(f"{self.name}: first_position_weight={self.first_position_weight} needs inputs shaped "
                             f"(batch, positions, features), got {tuple(x.shape)}; use first_position_weight=1 "
                             "for this model")
        first = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
        if attention_mask is not None and tuple(attention_mask.shape) == tuple(x.shape[:-1]):
            first = attention_mask.to(device=x.device).bool().long().argmax(dim=-1, keepdim=True).expand(x.shape[:-1])
        positions = torch.arange(x.shape[-2], device=x.device).expand(x.shape[:-1])
        scale = torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
        scale[positions == first] = math.sqrt(self.first_position_weight)
        return x * scale[..., None]

    def value(self) -> Tensor:
        """``S`` (d_in, d_in) in the accumulation dtype."""
        return self._collected() / self.n_tokens

    def take(self) -> Tensor:
        """``value()`` made in the accumulator's own memory (no second d x d buffer); the
        accumulator is spent afterwards."""
        S = self._collected().div_(self.n_tokens)
        self._sum, self.n_tokens = None, 0
        return S

    def _collected(self) -> Tensor:
        if self._sum is None or self.n_tokens == 0:
            raise ValueError(
                f"{self.name}: no calibration tokens were collected; pass at least one non-empty "
                "batch (and check that the attention mask is not all padding)"
            )
        return self._sum


class GroupStatistics(Mapping[str, SecondMoment]):
    """One ``SecondMoment`` per input-sharing group, keyed by group name.

    Args:
        groups: (name, d_in) for each group.
        dtype: ``"float32"`` or ``"float64"`` (``GlowQConfig.stats_dtype``).
        first_position_weight: ``GlowQConfig.first_position_weight`` (each ``SecondMoment``).
    """

    def __init__(self, groups: Iterable[tuple[str, int]], dtype: str = "float32", experts: Mapping | None = None,
                 first_position_weight: float = 1.0):
        if dtype not in _STATS_DTYPES:
            raise ValueError(f"stats dtype must be one of {list(_STATS_DTYPES)}, got {dtype!r}")
        self._stats = {name: SecondMoment(d, name, _STATS_DTYPES[dtype], first_position_weight) for name, d in groups}
        # experts module name -> calibration.experts.ExpertsStatistics, fed beside the groups
        self.experts = dict(experts or {})
        # group or experts module -> the identity of the tensor it read first (which read the very same input)
        self.inputs: dict[str, tuple] = {}
        self.time_s = 0.0  # spent accumulating (wall clock; on CUDA the launches, not their completion)

    def add_batch(self, group: str, x: Tensor, attention_mask: Tensor | None = None) -> None:
        if group not in self._stats:
            raise KeyError(f"unknown group {group!r}; known groups: {sorted(self._stats)}")
        t0 = time.perf_counter()
        self._stats[group].add_batch(x, attention_mask)
        self.time_s += time.perf_counter() - t0

    def note_input(self, name: str, x: Tensor) -> None:
        """Remember the first tensor ``name`` (a group or an experts module) read."""
        if name not in self.inputs:
            self.inputs[name] = (x.device, x.data_ptr(), tuple(x.shape), x.stride())

    def pop(self, group: str) -> Tensor:
        """``S`` of ``group``, releasing its accumulator (quantize_ frees each S once used)."""
        return self._stats.pop(group).take()

    def __getitem__(self, group: str) -> SecondMoment:
        return self._stats[group]

    def __iter__(self):
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)

    def nbytes(self) -> int:
        return (sum(s.d_in**2 * s.dtype.itemsize for s in self._stats.values())
                + sum(e.nbytes() for e in self.experts.values()))
