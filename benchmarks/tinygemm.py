"""PyTorch's int4 weight-only kernel (``aten._weight_int4pack_mm``, "tinygemm": what torchao's int4
weight-only layout runs) as a baseline, fed the same 4-bit codes, scales and zeros as ours.

Our dequantization is ``(q - z) * s``; tinygemm's is ``(q - 8) * s + zero_point``, so
``zero_point = (8 - z) * s`` (computed in float32, then cast) gives the same weight up to that
cast. On CUDA the kernel takes bf16 activations and codes packed two per byte; on the CPU its
``_for_cpu`` twin takes int32 codes and any float dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from glowq_fx.kernels.layout import PackedW4, unpack, zero_points
from glowq_fx.modules.linear import QuantizedLinear

INNER_K_TILES = 8


def tinygemm_pack(codes: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(packed weight, scales-and-zeros (K/gs, N, 2)) from codes (N, K) in [0, 16) and our
    scales / zeros (K/gs, N)."""
    if codes.is_cuda:
        u8 = (codes[:, ::2].int() << 4 | codes[:, 1::2].int()).to(torch.uint8)  # even column in the high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, INNER_K_TILES)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int().contiguous(), INNER_K_TILES)
    s = scales.float()
    scale_zero = torch.stack([s, (8 - zero_points(zeros)) * s], dim=2).to(dtype).contiguous()
    return packed, scale_zero


class TinygemmLinear(nn.Module):
    """``y = x W_q^T + bias`` through ``aten._weight_int4pack_mm`` (no low-rank correction)."""

    def __init__(self, packed: Tensor, scale_zero: Tensor, group_size: int, in_features: int, out_features: int,
                 bias: Tensor | None):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)
        self.register_buffer("bias", bias)
        self.group_size, self.in_features, self.out_features = group_size, in_features, out_features

    @classmethod
    def from_quantized(cls, q: QuantizedLinear) -> "TinygemmLinear":
        if q.A is not None:
            raise ValueError("tinygemm has no low-rank correction: convert a model quantized with method='none'")
        if q.in_features % q.group_size:
            raise ValueError(f"in_features {q.in_features} is not a multiple of the group size {q.group_size}; "
                             "tinygemm needs whole groups")
        if q.out_features % 16:
            raise ValueError(f"out_features {q.out_features} is not a multiple of 16, which tinygemm's packing needs")
        w = unpack(PackedW4(q.qweight, q.scales, q.zeros, q.group_size, q.in_features))
        packed, scale_zero = tinygemm_pack(w.codes, q.scales, q.zeros, q.scales.dtype)
        return cls(packed, scale_zero, q.group_size, q.in_features, q.out_features, q.bias)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scale_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zero)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def swap_to_tinygemm(model: nn.Module) -> int:
    """Replace every ``QuantizedLinear`` of ``model`` by a ``TinygemmLinear`` of the same codes;
    returns how many were replaced."""
    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if not swaps:
        raise ValueError(f"{type(model).__name__} has no QuantizedLinear: quantize it with method='none' first")
    for name, q in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, TinygemmLinear.from_quantized(q))
    return len(swaps)
