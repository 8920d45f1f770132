"""The CPU int8 weight-only kernels for ``Int8Linear``: our GEMV, else PyTorch's int8 kernel.

Decode rows run our GEMV (``cpu_gemv.int8_matmul``: int16-rounded activations, float32 scales)
wherever it loads, up to its ``MAX_ROWS`` (more rows dequantize and run the float GEMM); PyTorch's
kernel (``aten._weight_int8pack_mm``) where ours does not load. ``kernel_scales`` makes the
scales in the chosen kernel's dtype, and ``int8_matmul`` runs the kernel those scales are for.

PyTorch's kernel takes the codes as they are stored, (N, K) int8 with one scale per output row, so
nothing is converted. Like the int4 kernel it is vectorised for bfloat16 activations (float32
runs a scalar loop, ~7x slower than bfloat16 on the 2-core AVX2 machine for a 49152 x 576 head):
it runs in bfloat16 whatever the model's dtype, and the output is cast back. On the SmolLM2 head
that rounding costs +0.1% perplexity over the same int8 codes in float32 (docs/usage.md).
"""
from __future__ import annotations

import torch
from torch import Tensor

from glowq_fx.kernels import (
    cpu_gemv,
    cpu_int4,  # one answer to what this CPU's kernels dispatch to
)

KERNEL_DTYPE = torch.bfloat16  # PyTorch's kernel's activations and scales


def unsupported_reason(kernel: str = "auto") -> str | None:
    """Why an int8 linear cannot run a CPU int8 kernel (``kernel``: cpu_int4.KERNELS) on this machine,
    or None when it can."""
    if cpu_int4.chosen_kernel(kernel) == "glowq":
        return None
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return f"torch {torch.__version__} has no aten._weight_int8pack_mm"
    if cpu_int4.capability() not in cpu_int4.VECTORISED:
        return (f"this CPU's PyTorch kernels dispatch to {cpu_int4.capability()}, where the int8 kernel is not "
                "vectorised (it needs AVX2 or AVX-512)")
    return None


def kernel_scales(scales: Tensor, kernel: str = "auto") -> Tensor:
    """The per-row scales as the chosen kernel takes them (a copy: float32 for ours, bfloat16 for PyTorch's)."""
    dtype = torch.float32 if cpu_int4.chosen_kernel(kernel) == "glowq" else KERNEL_DTYPE
    return scales.detach().to(dtype, copy=True).contiguous()


def int8_matmul(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """``x (qweight * scales[:, None])^T`` in ``x``'s dtype through the kernel ``scales`` (from
    ``kernel_scales``) are for: ours for decode rows, else PyTorch's (bfloat16 inside)."""
    if scales.dtype == torch.float32:
        if x.numel() // max(x.shape[-1], 1) <= cpu_gemv.MAX_ROWS:
            return cpu_gemv.int8_matmul(x, qweight, scales)
        # many rows (a perplexity window): dequantize once, then the float GEMM
        return torch.nn.functional.linear(x, qweight.to(x.dtype) * scales.to(x.dtype).unsqueeze(1))
    x2 = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
