"""PyTorch's CPU int8 weight-only kernel (``aten._weight_int8pack_mm``) for ``Int8Linear``.

The kernel takes the codes as they are stored, (N, K) int8 with one scale per output row, so
nothing is converted. Like the int4 kernel it is vectorised for bfloat16 activations (float32
runs a scalar loop, ~7x slower than bfloat16 on the 2-core AVX2 machine for a 49152 x 576 head):
it runs in bfloat16 whatever the model's dtype, and the output is cast back. On the SmolLM2 head
that rounding costs +0.1% perplexity over the same int8 codes in float32 (docs/usage.md).
"""
from __future__ import annotations

import torch
from torch import Tensor

from glowq_fx.kernels import cpu_int4  # one answer to what this CPU's kernels dispatch to

KERNEL_DTYPE = torch.bfloat16


def unsupported_reason() -> str | None:
    """Why an int8 linear cannot run the CPU int8 kernel on this machine, or None when it can."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return f"torch {torch.__version__} has no aten._weight_int8pack_mm"
    if cpu_int4.capability() not in cpu_int4.VECTORISED:
        return (f"this CPU's PyTorch kernels dispatch to {cpu_int4.capability()}, where the int8 kernel is not "
                "vectorised (it needs AVX2 or AVX-512)")
    return None


def kernel_scales(scales: Tensor) -> Tensor:
    """The per-row scales as the kernel takes them (a copy in its dtype)."""
    return scales.detach().to(KERNEL_DTYPE, copy=True).contiguous()


def int8_matmul(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """``x (qweight * scales[:, None])^T`` in ``x``'s dtype through the kernel (bfloat16 inside);
    ``scales`` from ``kernel_scales``."""
    x2 = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
