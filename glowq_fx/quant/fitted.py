"""Round to nearest on a grid fitted to each group: the scale and a fractional zero point that
minimise the group's activation-weighted squared error.

The grid is ``deq(q) = (q - z) s`` as everywhere, but ``z`` need not be an integer: it lies on a
grid of ``1 / ZERO_STEPS`` in ``[0, 2**bits - 1]``, which the packed layout stores in one byte as
``16 z`` (``kernels.layout``), as it stores integer zero points: it costs nothing over them. An
integer ``z`` shifts the grid by up to half a step against the group's range (RTN's lost accuracy
at the range's ends); a min/max grid with a float minimum (GGUF's Q4_1, HQQ, torchao, quanto) does
not, and neither does this one.

Per (row, group), with ``d = diag(S)`` weighting the columns (uniform without ``S``):

1. start from the best of the clipped grids (``quant.clip``: integer zero points) and the same
   clipped ranges with fractional zero points, by ``sum_k d_k (w_k - deq_k)^2``;
2. ``FIT_ROUNDS`` rounds of alternating least squares: for the current codes ``q`` the line
   ``w ~ a q + b`` of least weighted squares gives ``s = a``, ``z = -b / a`` (rounded to the
   stored grids), and the codes are rounded again on it. A round is kept per group only where it
   lowers that group's weighted error, so no group ends worse than its clipped grid.

The cross terms of ``S`` are GPTQ's business (``quant.gptq``); this quantizer stays per group.
"""
from __future__ import annotations

import torch
from torch import Tensor

from glowq_fx.config import QuantizationConfig
from glowq_fx.quant.clip import CLIP_MIN, CLIP_STEPS, clipped_grids, grouped
from glowq_fx.quant.rtn import QuantizedWeight, check_bits, codes_for
from glowq_fx.registry import QUANTIZERS

ZERO_STEPS = 16  # zero points on a 1/16 grid: k / 16 with k <= 240 is exact in bf16, fp16 and fp32
FIT_ROUNDS = 8  # alternating least-squares rounds (most groups settle within 3-4)


def _round_zero(z: Tensor, maxq: int) -> Tensor:
    return torch.round(z * ZERO_STEPS).div_(ZERO_STEPS).clamp_(0, maxq)


def _stored_scale(s: Tensor, dtype: torch.dtype) -> Tensor:
    """``s`` (float32) as ``dtype`` stores it, never zero or negative."""
    return s.to(dtype).float().clamp_min(torch.finfo(dtype).tiny)


def fractional_codes(w: Tensor, s: Tensor, z: Tensor, maxq: int) -> Tensor:
    """Nearest codes of ``w`` (..., g) on the grid (s, z) of shape (...); ``rtn.codes_for`` rounds
    ``w / s`` before adding ``z``, the same only for an integer ``z``."""
    return torch.div(w, s.unsqueeze(-1)).add_(z.unsqueeze(-1)).round_().clamp_(0, maxq)


def _weighted_error(w: Tensor, q: Tensor, s: Tensor, z: Tensor, d: Tensor) -> Tensor:
    """``sum_k d_k (w_k - (q_k - z) s)^2`` per group; ``w``, ``q`` (..., G, g), ``s``, ``z`` (..., G)."""
    return ((q - z.unsqueeze(-1)).mul_(s.unsqueeze(-1)).sub_(w).square_() * d).sum(-1)


def _least_squares_grid(w: Tensor, q: Tensor, d: Tensor, z: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """(scale, zero) in float32 of the weighted least-squares line ``w ~ s (q - z)`` per group
    (symmetric: ``z`` held); NaN where the codes do not determine a positive scale."""
    Sd = d.expand_as(q).sum(-1)
    dq, dw = d * q, d * w
    Sq, Sw, Sqq, Sqw = dq.sum(-1), dw.sum(-1), (dq * q).sum(-1), (dq * w).sum(-1)
    if symmetric:
        # w ~ s (q - z): s = sum d w (q - z) / sum d (q - z)^2
        num = Sqw - z * Sw
        den = Sqq - 2 * z * Sq + z * z * Sd
        s = num / den
        z_new = z
    else:
        den = Sd * Sqq - Sq * Sq
        s = (Sd * Sqw - Sq * Sw) / den  # the slope a of w ~ a q + b
        b = (Sw - s * Sq) / Sd
        z_new = -b / s
    ok = (den > 0) & (s > 0) & torch.isfinite(s) & torch.isfinite(z_new)
    nan = torch.full_like(s, float("nan"))
    return torch.where(ok, s, nan), torch.where(ok, z_new, nan)


def quantize_fitted(W: Tensor, S: Tensor | None = None, group_size: int = 128, *, bits: int = 4,
                    symmetric: bool = False, rounds: int = FIT_ROUNDS) -> QuantizedWeight:
    """``W`` (N, K) to 4-bit codes on each group's fitted grid (module docstring); ``S`` (K, K) or
    None. Scales and zeros in ``W.dtype``; symmetric grids keep ``z = 2**(bits-1)`` and fit the scale."""
    w, d, g = grouped(W, S, group_size)
    N, K = W.shape
    s, z, q = fitted_grids(w, d, bits=bits, symmetric=symmetric, dtype=W.dtype, rounds=rounds)
    return QuantizedWeight(codes=q.reshape(N, -1).to(torch.uint8), scales=s.to(W.dtype), zeros=z.to(W.dtype),
                           group_size=g, in_features=K, bits=bits)


def fitted_grids(w: Tensor, d: Tensor, *, bits: int, symmetric: bool, dtype: torch.dtype,
                 rounds: int = FIT_ROUNDS) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, zero, codes) in float32 of each group's fitted grid (module docstring): ``w`` float32
    (..., G, g), ``d`` the column weights broadcastable to it; scales and zeros exact in ``dtype``."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    maxq = check_bits(bits)
    s, z = clipped_grids(w, d, bits=bits, symmetric=symmetric, dtype=dtype)
    q = codes_for(w, s, z, bits)
    err = _weighted_error(w, q, s, z, d)

    def keep_better(s_new: Tensor, z_new: Tensor) -> bool:
        nonlocal s, z, q, err
        usable = torch.isfinite(s_new) & torch.isfinite(z_new)
        s_new = _stored_scale(torch.where(usable, s_new, s), dtype)
        z_new = torch.where(usable, z_new, z)
        if not symmetric:
            z_new = _round_zero(z_new, maxq)
        q_new = fractional_codes(w, s_new, z_new, maxq)
        err_new = _weighted_error(w, q_new, s_new, z_new, d)
        better = err_new < err
        s, z = torch.where(better, s_new, s), torch.where(better, z_new, z)
        q = torch.where(better.unsqueeze(-1), q_new, q)
        err = torch.where(better, err_new, err)
        return bool(better.any())

    if not symmetric:  # the clipped ranges again, each with its fractional zero point
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        for alpha in torch.linspace(1.0, CLIP_MIN, CLIP_STEPS).tolist():
            s_a = ((hi - lo) * alpha / maxq).clamp_min(torch.finfo(torch.float32).tiny)
            keep_better(s_a, -lo * alpha / s_a)
    for _ in range(rounds):
        if not keep_better(*_least_squares_grid(w, q, d, z, symmetric)):
            break
    return s, z, q


@QUANTIZERS.register("fitted")
def fitted_quantizer(W: Tensor, S: Tensor | None, config: QuantizationConfig) -> QuantizedWeight:
    """``GlowQConfig(quantizer="fitted")``: RTN on each group's least-squares grid with a fractional
    zero point, weighted by ``diag(S)``."""
    return quantize_fitted(W, S, config.group_size, bits=config.bits, symmetric=config.symmetric)
