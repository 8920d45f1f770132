"""INT4 group-wise quantization grid and round-to-nearest (RTN).

Notation (as in GPTQ): a weight ``W`` is (N out x K in); its columns are cut into groups of
``g`` consecutive input columns; each (row, group) has a scale ``s`` and an integer zero
point ``z`` so that ``deq(q) = (q - z) * s`` with codes ``q`` in ``[0, 2**bits - 1]``.

Asymmetric (default): the range ``[min(w, 0), max(w, 0)]`` of the group is split into 15
steps, ``z = round(-min / s)``. Symmetric: ``s = max|w| / 7.5``, ``z = 8``. In both cases
every weight lies within half a step of the grid (``|w - deq(q)| <= s / 2``); ``s`` is rounded
*up* to the model dtype before the codes are chosen so that the bound holds for the stored
scale too.

Padding: when ``K`` is not a multiple of ``g`` (SmolLM2's 576 with g = 128), the last group is
padded with zero columns up to ``K_pad = ceil(K / g) * g``. Zero never widens a group's range
(0 is always inside it), so the last group's scale and zero come from its real columns only,
and a padded column gets the code ``z``, which dequantizes to exactly 0. Per-channel
(``group_size=-1``) is one group of exactly ``K`` columns (how codes are stored in words is
the kernels' concern, ``glowq_fx.kernels.layout``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from glowq_fx._checks import all_finite
from glowq_fx.config import BITS, EMBEDDING_BITS, GROUP_SIZES, QuantizationConfig
from glowq_fx.registry import QUANTIZERS


@dataclass
class QuantizedWeight:
    """Codes and grid of one quantized weight, independent of any kernel layout.

    Attributes:
        codes: uint8 (N, K_pad), values in ``[0, 2**bits - 1]``; columns ``>= in_features``
            are padding and hold the zero point of their group.
        scales: model dtype (N, n_groups).
        zeros: model dtype (N, n_groups), zero points: integers, except on the fitted grids
            (``quant.fitted``: multiples of 1/16); either way in ``[0, 2**bits - 1]``.
        group_size: columns per group in ``codes`` (``K`` for per-channel).
        in_features: K, the number of real input columns.
        bits: code width (4).
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    group_size: int
    in_features: int
    bits: int = 4

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W_q`` (N, K) in ``dtype`` (default: the scales' dtype), padding removed."""
        g = self.group_size
        w = self.codes.to(torch.float32, copy=True).view(self.out_features, -1, g)  # one buffer, worked in place
        w.sub_(self.zeros.float().unsqueeze(-1)).mul_(self.scales.float().unsqueeze(-1))
        w = w.view(self.out_features, -1)[:, : self.in_features]
        return w.to(dtype or self.dtype)

    def nbytes(self) -> int:
        """Storage of the codes at ``bits`` each plus scales and zeros."""
        code_bytes = self.codes.numel() * self.bits // 8
        return code_bytes + self.scales.numel() * self.scales.element_size() * 2


def group_geometry(in_features: int, group_size: int) -> tuple[int, int]:
    """(effective group size g, number of groups) for ``in_features`` columns."""
    if group_size not in GROUP_SIZES:
        raise ValueError(
            f"unsupported group_size={group_size}: choose one of {list(GROUP_SIZES)} "
            "(-1 means per-channel)"
        )
    if in_features < 1:
        raise ValueError(f"in_features must be positive, got {in_features}")
    if group_size == -1:
        return in_features, 1
    return group_size, math.ceil(in_features / group_size)


def check_bits(bits: int, widths: tuple[int, ...] = BITS) -> int:
    """The largest code at ``bits``: 4 for the linears (``BITS``); embedding tables take 8 too."""
    if bits not in widths:
        raise ValueError(f"unsupported bits={bits}: glowq-fx stores INT4 codes (INT8 only for embedding tables)")
    return (1 << bits) - 1


def _round_up_to_dtype(s: Tensor, dtype: torch.dtype) -> Tensor:
    """``s`` (float32) rounded to ``dtype`` and never below ``s``: keeps the half-step bound."""
    s_d = s.to(dtype).float()
    below = s_d < s
    if below.any():
        bumped = (s_d * (1 + torch.finfo(dtype).eps)).to(dtype).float()
        s_d = torch.where(below, bumped, s_d)
    return s_d.clamp_min(torch.finfo(dtype).tiny)


def group_params(
    w: Tensor, *, bits: int, symmetric: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Scale and zero point of each group; ``w`` is float32 (..., g), reduced over the last dim.

    Returns float32 tensors of shape ``w.shape[:-1]`` whose values are exactly representable
    in ``dtype`` (the caller stores them in ``dtype``).
    """
    maxq = check_bits(bits, (*BITS, *EMBEDDING_BITS[1:]))  # quantize_gptq checks its own bits first
    if symmetric:
        absmax = w.abs().amax(dim=-1)
        s = absmax / (maxq / 2)
        s = torch.where(s == 0, torch.ones_like(s), s)
        s = _round_up_to_dtype(s, dtype)
        z = torch.full_like(s, (maxq + 1) // 2)
    else:
        w_min = w.amin(dim=-1).clamp(max=0)
        w_max = w.amax(dim=-1).clamp(min=0)
        s = (w_max - w_min) / maxq
        s = torch.where(s == 0, torch.ones_like(s), s)
        s = _round_up_to_dtype(s, dtype)
        z = torch.clamp(torch.round(-w_min / s), 0, maxq)
    return s, z


def codes_for(w: Tensor, s: Tensor, z: Tensor, bits: int) -> Tensor:
    """Nearest codes of ``w`` (float32 (..., g)) on the grid (s, z) broadcast over the last dim."""
    maxq = (1 << bits) - 1
    return torch.div(w, s.unsqueeze(-1)).round_().add_(z.unsqueeze(-1)).clamp_(0, maxq)  # one temporary


def check_weight(W: Tensor) -> None:
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got dtype {W.dtype}")
    if not all_finite(W):
        raise ValueError("the weight contains NaN or Inf; quantize a finite weight")


def quantize_rtn(
    W: Tensor, group_size: int = 128, *, bits: int = 4, symmetric: bool = False
) -> QuantizedWeight:
    """Round-to-nearest INT4 quantization of ``W`` (N, K), group-wise along input columns.

    Scales and zeros are stored in ``W.dtype`` (the model dtype).
    """
    check_weight(W)
    N, K = W.shape
    g, n_groups = group_geometry(K, group_size)
    w = torch.nn.functional.pad(W.float(), (0, g * n_groups - K)).view(N, n_groups, g)
    s, z = group_params(w, bits=bits, symmetric=symmetric, dtype=W.dtype)
    q = codes_for(w, s, z, bits)
    return QuantizedWeight(
        codes=q.reshape(N, -1).to(torch.uint8),
        scales=s.to(W.dtype),
        zeros=z.to(W.dtype),
        group_size=g,
        in_features=K,
        bits=bits,
    )


def quantization_error(W: Tensor, qw: QuantizedWeight) -> Tensor:
    """``E = W - deq(Q(W))`` in float32, shape (N, K)."""
    if tuple(W.shape) != (qw.out_features, qw.in_features):
        raise ValueError(
            f"weight shape {tuple(W.shape)} does not match the quantized weight "
            f"({qw.out_features}, {qw.in_features})"
        )
    E = qw.dequantize(torch.float32).neg_().add_(W)  # in the dequantized buffer: no second (N, K)
    return E if E.is_contiguous() else E.contiguous()  # padded K: the view's rows are K_pad apart


def quantize_int8_rows(W: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 of ``W`` (N, K), one scale per row: ``s = max|w| / 127`` (rounded up to
    ``W.dtype``, so no code leaves [-127, 127]), ``q = round(w / s)``. Returns (codes int8 (N, K),
    scales (N,) in ``W.dtype``); ``q * s`` is the dequantized weight. An all-zero row gets scale
    1 and zero codes (exact)."""
    check_weight(W)
    w = W.float()
    s = w.abs().amax(dim=1) / 127
    s = _round_up_to_dtype(torch.where(s == 0, torch.ones_like(s), s), W.dtype)
    q = torch.div(w, s.unsqueeze(1)).round_().clamp_(-127, 127)
    return q.to(torch.int8), s.to(W.dtype)


@QUANTIZERS.register("rtn")
def rtn_quantizer(W: Tensor, S: Tensor | None, config: QuantizationConfig) -> QuantizedWeight:
    """``GlowQConfig(quantizer="rtn")``: round to nearest on the config's grid (``S`` unused)."""
    return quantize_rtn(W, config.group_size, bits=config.bits, symmetric=config.symmetric)
