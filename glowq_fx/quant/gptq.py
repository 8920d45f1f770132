"""GPTQ (Frantar et al., 2023) driven by the input-sharing group's second moment.

GPTQ minimizes ``tr(E H E^T)`` with ``H = X X^T``; the group's ``S = E[x x^T]`` is ``H`` up to
a constant factor, which changes neither the solution nor the damping (a fraction of the mean
diagonal), so the same ``S`` that whitens GlowQ's objective drives GPTQ: calibration runs once.

Symbols follow the reference implementation: ``H``, ``Hinv`` (upper Cholesky factor of
``H^-1``), ``W1``/``Q1``/``Err1`` for the current lazy block.

Codes land in the same contiguous group layout as RTN (``rtn.QuantizedWeight``). With
act-order the columns are visited by decreasing ``diag(H)``; the group parameters are then fixed
up front from the unquantized weight ("static groups", as in AutoGPTQ), so a column's group is
still ``k // g`` and no ``g_idx`` permutation is needed at inference.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from glowq_fx._checks import all_finite
from glowq_fx.config import QuantizationConfig
from glowq_fx.quant.fitted import fractional_codes
from glowq_fx.quant.rtn import (
    QuantizedWeight,
    check_bits,
    check_weight,
    codes_for,
    group_geometry,
    group_params,
)
from glowq_fx.registry import QUANTIZERS

# (w (..., G, g) float32, column weights d broadcastable to it) -> (scale, zero) (..., G) in float32
GroupGrid = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def quantize_gptq(
    W: Tensor,
    S: Tensor,
    group_size: int = 128,
    *,
    bits: int = 4,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    shrink: float = 0.0,
    grid: GroupGrid | None = None,
) -> QuantizedWeight:
    """GPTQ quantization of ``W`` (N, K) with Hessian proxy ``S`` (K, K).

    Args:
        W: weight in the model dtype; scales and zeros are stored in that dtype.
        S: symmetric positive semi-definite second moment of the inputs (any float dtype).
        damp: added ``damp * mean(diag(S))`` to the diagonal before inversion.
        block_size: columns per lazy batch update (rounded up to a multiple of the group).
        act_order: visit columns by decreasing ``diag(S)`` with static groups.
        shrink: the cross-column terms of ``H`` scaled by ``1 - shrink`` (``H`` shrunk toward its
            diagonal); 1: no error feedback, each column rounded on its group's grid.
        grid: each group's (scale, zero) from its weights and their ``diag(S)`` weights
            (``quant.fitted_gptq``: fitted grids, fractional zeros); None: the min/max grid of RTN.
    """
    check_weight(W)
    maxq = check_bits(bits)  # 4: the packed layout of a linear
    N, K = W.shape
    if S.shape != (K, K):
        raise ValueError(f"S must be ({K}, {K}) for a weight with {K} input columns, got {tuple(S.shape)}")
    if not all_finite(S):
        raise ValueError("S contains NaN or Inf; the calibration activations were not finite")
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink must lie in [0, 1], got {shrink!r}")
    g, n_groups = group_geometry(K, group_size)
    W_work, H = _without_dead_inputs(W, S)
    if shrink:
        diagonal = torch.diagonal(H).clone()
        H.mul_(1.0 - shrink).diagonal().copy_(diagonal)
    if grid is None:
        def grid(w: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
            return group_params(w, bits=bits, symmetric=symmetric, dtype=W.dtype)
        def codes_of(w: Tensor, s: Tensor, z: Tensor) -> Tensor:
            return codes_for(w, s, z, bits)
    else:
        def codes_of(w: Tensor, s: Tensor, z: Tensor) -> Tensor:  # zero points need not be integers
            return fractional_codes(w, s, z, maxq)
    scales = torch.empty(N, n_groups, device=W.device)
    zeros = torch.empty(N, n_groups, device=W.device)
    d = torch.diagonal(H).clone()  # the column weights a grid may use (before damping)
    if act_order:
        padded = torch.nn.functional.pad(W_work, (0, g * n_groups - K))
        d_padded = torch.nn.functional.pad(d, (0, g * n_groups - K)).view(n_groups, g)
        scales[:], zeros[:] = grid(padded.view(N, n_groups, g), d_padded)
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W_work, H = W_work[:, perm], H[perm][:, perm]
        block = block_size
    else:
        perm = torch.arange(K, device=W.device)
        block = -(-block_size // g) * g  # groups never straddle a block
    codes = _gptq_columns(W_work, _upper_inverse_factor(H, damp), scales, zeros, perm, g, block, d[perm],
                          grid=grid, codes_of=codes_of, static_groups=act_order)
    codes_orig = torch.empty_like(codes)
    codes_orig[:, perm] = codes
    # padded columns hold their group's zero point (rounded: fitted grids' need not be integers), as RTN lays them out
    pad_codes = torch.round(zeros[:, -1:]).expand(N, g * n_groups - K)
    codes_full = torch.cat([codes_orig, pad_codes], dim=1)
    assert 0 <= codes_full.min() and codes_full.max() <= maxq
    return QuantizedWeight(
        codes=codes_full.to(torch.uint8),
        scales=scales.to(W.dtype),
        zeros=zeros.to(W.dtype),
        group_size=g,
        in_features=K,
        bits=bits,
    )


def _without_dead_inputs(W: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """``(W, H)`` in float32, with inputs never active (zero diagonal of ``S``) given a unit
    diagonal and a zero weight: their weight is irrelevant, quantized as 0."""
    W_work = W.float().clone()
    H = S.to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W_work[:, dead] = 0
    return W_work, H


def _upper_inverse_factor(H: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (changes ``H`` in place)."""
    H += damp * torch.mean(torch.diagonal(H)) * torch.eye(H.shape[0], device=H.device)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(
            f"GPTQ: S + damping is not positive definite (damp={damp}); raise GlowQConfig.gptq_damp "
            "or calibrate on more tokens"
        ) from exc


def _gptq_columns(W_work: Tensor, Hinv: Tensor, scales: Tensor, zeros: Tensor, perm: Tensor, g: int, block: int,
                  d: Tensor, *, grid: GroupGrid, codes_of: Callable[[Tensor, Tensor, Tensor], Tensor],
                  static_groups: bool) -> Tensor:
    """The codes of each column in turn (permuted order), each column's rounding error spread over
    the columns after it through ``Hinv``, lazily in blocks of ``block`` columns. Without
    ``static_groups`` each group's scale and zero are fitted by ``grid`` (into ``scales``/``zeros``)
    when its first column is reached, from the weight as the earlier columns left it and the
    columns' weights ``d`` (permuted order)."""
    N, K = W_work.shape
    codes = torch.empty(N, K, device=W_work.device)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W_work[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static_groups and col % g == 0:
                gi = col // g
                s_g, z_g = grid(W1[:, i : i + g].unsqueeze(1), d[col : col + g].unsqueeze(0))
                scales[:, gi], zeros[:, gi] = s_g.squeeze(1), z_g.squeeze(1)
            gi = int(perm[col]) // g
            s, z = scales[:, gi], zeros[:, gi]
            w = W1[:, i]
            q = codes_of(w.unsqueeze(-1), s, z).squeeze(-1)
            codes[:, col] = q
            err = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W_work[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes


@QUANTIZERS.register("gptq")
def gptq_quantizer(W: Tensor, S: Tensor, config: QuantizationConfig) -> QuantizedWeight:
    """``GlowQConfig(quantizer="gptq")``: GPTQ driven by the group's second moment ``S``."""
    return quantize_gptq(W, S, config.group_size, bits=config.bits, symmetric=config.symmetric,
                         damp=config.gptq_damp, block_size=config.gptq_block_size, act_order=config.gptq_act_order,
                         shrink=config.gptq_shrink)
