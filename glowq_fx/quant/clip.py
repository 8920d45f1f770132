"""Round to nearest on a clipped grid: each group's range shrunk by the factor that minimises its
activation-weighted rounding error (the clipping search of AWQ's ``auto_clip`` and of
AutoRound's optimised RTN, in closed form per group).

A group's grid covers ``[alpha min(w, 0), alpha max(w, 0)]`` (symmetric: ``alpha max|w|``) for
``alpha`` in ``CLIP_STEPS`` steps from 1 down to ``CLIP_MIN``; the weights outside the shrunk range
clip to its ends, the others round more finely. Each (row, group) keeps the ``alpha`` with the
smallest ``sum_k d_k (w_k - deq_k)^2``, ``d = diag(S)`` (the second moment of the inputs: the
columns the activations use most weigh most; uniform without ``S``). ``alpha = 1`` is plain RTN,
so no group's weighted error is ever above RTN's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from glowq_fx.config import QuantizationConfig
from glowq_fx.quant.rtn import (
    QuantizedWeight,
    check_weight,
    codes_for,
    group_geometry,
    group_params,
)
from glowq_fx.registry import QUANTIZERS

CLIP_STEPS = 20  # as AWQ's auto_clip (n_grid=20)
CLIP_MIN = 0.5  # the narrowest range tried, as AWQ's max_shrink=0.5


def quantize_clipped(W: Tensor, S: Tensor | None = None, group_size: int = 128, *, bits: int = 4,
                     symmetric: bool = False, steps: int = CLIP_STEPS, narrowest: float = CLIP_MIN) -> QuantizedWeight:
    """``W`` (N, K) to 4-bit codes on each group's best clipped grid (module docstring); ``S``
    (K, K) or None. Scales and zeros in ``W.dtype``."""
    w, d, g = grouped(W, S, group_size)
    N, K = W.shape
    s, z = clipped_grids(w, d, bits=bits, symmetric=symmetric, dtype=W.dtype, steps=steps, narrowest=narrowest)
    q = codes_for(w, s, z, bits)
    return QuantizedWeight(codes=q.reshape(N, -1).to(torch.uint8), scales=s.to(W.dtype),
                           zeros=z.to(W.dtype), group_size=g, in_features=K, bits=bits)


def grouped(W: Tensor, S: Tensor | None, group_size: int) -> tuple[Tensor, Tensor, int]:
    """``W`` (checked) as float32 (N, n_groups, g), zero-padded, the column weights ``diag(S)`` as
    (n_groups, g) (ones without ``S``; padded columns weigh 0), and ``g``."""
    check_weight(W)
    N, K = W.shape
    if S is not None and tuple(S.shape) != (K, K):
        raise ValueError(f"S must be ({K}, {K}) for a weight with {K} input columns, got {tuple(S.shape)}")
    g, n_groups = group_geometry(K, group_size)
    w = torch.nn.functional.pad(W.float(), (0, g * n_groups - K)).view(N, n_groups, g)
    d = torch.ones(K, device=W.device) if S is None else torch.diagonal(S).float().to(W.device).clamp_min(0)
    return w, torch.nn.functional.pad(d, (0, g * n_groups - K)).view(n_groups, g), g


def clipped_grids(w: Tensor, d: Tensor, *, bits: int, symmetric: bool, dtype: torch.dtype,
                  steps: int = CLIP_STEPS, narrowest: float = CLIP_MIN) -> tuple[Tensor, Tensor]:
    """(scale, zero) in float32 (..., G) of the clipped grid with the least ``sum_k d_k (w_k - deq_k)^2``
    per group; ``w`` float32 (..., G, g), ``d`` broadcastable to it. Values exact in ``dtype``."""
    if steps < 1 or not 0 < narrowest <= 1:
        raise ValueError(f"steps must be >= 1 and narrowest in (0, 1], got {steps}, {narrowest}")
    best_err = best_s = best_z = None
    for alpha in torch.linspace(1.0, narrowest, steps).tolist():
        s, z = group_params(w * alpha, bits=bits, symmetric=symmetric, dtype=dtype)
        q = codes_for(w, s, z, bits)
        err = ((q - z.unsqueeze(-1)).mul_(s.unsqueeze(-1)).sub_(w).square_() * d).sum(-1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


@QUANTIZERS.register("clip")
def clip_quantizer(W: Tensor, S: Tensor | None, config: QuantizationConfig) -> QuantizedWeight:
    """``GlowQConfig(quantizer="clip")``: RTN on each group's clipped grid, weighted by ``diag(S)``."""
    return quantize_clipped(W, S, config.group_size, bits=config.bits, symmetric=config.symmetric)
