"""An int8 weight-only linear: the output head's storage when it stays out of the 4-bit groups.

On models with a large vocabulary the head is most of the bytes a decode step reads (SmolLM2:
49152 x 576, 113 MB in float32 against 53 MB for the 4-bit body), so leaving it in floating point
caps the decode speed of a 4-bit model. Stored int8 with one scale per output row
(``quant.rtn.quantize_int8_rows``; torchao's int8 weight-only convention) it reads a quarter of
float32's bytes, and a CPU int8 kernel runs it (``kernels.cpu_int8``); elsewhere the
forward dequantizes and runs the float GEMM. A tied input embedding reads the same codes
(``modules.embedding``, the per-row int8 layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glowq_fx.kernels import cpu_int8
from glowq_fx.quant.rtn import quantize_int8_rows


class Int8Linear(nn.Module):
    """``y = x (q * s[:, None])^T + bias``.

    Buffers:
        qweight: int8 (out_features, in_features).
        scales: (out_features,) in the model dtype.
        bias: (out_features,) in the model dtype, or None.

    ``use_cpu_int8_kernel`` (called by ``modules.kernels.use_cpu_kernels``) turns a CPU kernel
    (our GEMV, else PyTorch's) on where the machine has it, with the scales in the kernel's dtype (``kernel_scales``,
    non-persistent): a cast inside the graph would reach Inductor's int8 lowering as an unrealized
    node, which it cannot take (torch 2.13).
    """

    glowq_quantized = True  # capture.run.check_model: not quantized twice

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None = None):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
        N, K = qweight.shape
        if tuple(scales.shape) != (N,) or not scales.is_floating_point():
            raise ValueError(f"scales must be a float ({N},) tensor, got {scales.dtype} {tuple(scales.shape)}")
        if bias is not None and tuple(bias.shape) != (N,):
            raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
        self.in_features, self.out_features = K, N
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().to(scales.dtype).clone())
        self.register_buffer("kernel_scales", None, persistent=False)
        self.cpu_kernel = "auto"  # the CPU kernel asked for (cpu_int4.KERNELS), kept across moves

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """``linear`` quantized to int8, one scale per output row (its weight is left untouched)."""
        qweight, scales = quantize_int8_rows(linear.weight.detach())
        return cls(qweight, scales, linear.bias)

    def cpu_int8_unsupported(self, kernel: str = "auto") -> str | None:
        """Why this linear cannot run a CPU int8 kernel (``kernel``: cpu_int4.KERNELS) here, or None when it can."""
        if self.qweight.device.type != "cpu":
            return f"on {self.qweight.device.type}, not the CPU"
        if hasattr(self.qweight, "to_local"):
            return "a tensor-parallel shard"
        return cpu_int8.unsupported_reason(kernel)

    def use_cpu_int8_kernel(self, enable: bool = True, kernel: str = "auto") -> str | None:
        """Run a CPU int8 kernel, ``kernel`` "auto" (ours where it loads, else PyTorch's), "glowq"
        or "aten" (``enable=False``: the dequantize + GEMM path). Returns why the kernel cannot be
        used, or None when it is."""
        self.cpu_kernel = kernel
        why = self.cpu_int8_unsupported(kernel) if enable else "disabled"
        self.kernel_scales = cpu_int8.kernel_scales(self.scales, kernel) if why is None else None
        return why

    @property
    def kernel_name(self) -> str:
        """"cpu_gemv8" (ours), "cpu_int8" (PyTorch's int8 kernel) or "reference" (dequantize + matmul)."""
        if self.kernel_scales is None:
            return "reference"
        return "cpu_gemv8" if self.kernel_scales.dtype == torch.float32 else "cpu_int8"

    def _apply(self, fn, recurse=True):
        # the kernel's scales belong to the device they were made for: made again after a move
        # or cast (or dropped, off the CPU), never moved with the rest
        converted = self.kernel_scales is not None
        self.kernel_scales = None
        out = super()._apply(fn, recurse)
        if converted:
            self.use_cpu_int8_kernel(kernel=self.cpu_kernel)
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self.kernel_scales is not None:  # the scales changed under the kernel's copy
            self.use_cpu_int8_kernel(kernel=self.cpu_kernel)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight (out_features, in_features) in ``dtype`` (default: the scales')."""
        w = self.qweight.float() * self.scales.float().unsqueeze(1)
        return w.to(dtype or self.scales.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_scales is not None and x.device.type == "cpu":
            y = cpu_int8.int8_matmul(x, self.qweight, self.kernel_scales)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
