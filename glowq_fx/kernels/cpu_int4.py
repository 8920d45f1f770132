"""The CPU int4 kernels for our packed codes: our GEMV, else PyTorch's int4 kernel.

Two kernels serve decode rows on the CPU. Ours (``cpu_gemv``: AVX2 integer dot products against
activations rounded to int16, 2-3x faster than PyTorch's here and closer to float) is used wherever
it builds and loads; PyTorch's (``aten._weight_int4pack_mm_for_cpu``) where it does not, or when
asked for (``kernel="aten"``). ``convert`` makes one kernel's layout, ``int4_matmul`` runs whichever
layout it is given (ours: float32 parameters; PyTorch's: bfloat16).

PyTorch's kernel reads its own weight layout, made by ``aten._convert_weight_to_int4pack_for_cpu`` from
(N, K) int32 codes. That layout depends on the instruction set PyTorch dispatches to in the
process that converts (AVX-512 interleaves 64 output rows, AVX2 32), so it is made on the
machine that runs the model, at quantize or load time, and never stored in a checkpoint.

Its dequantization is ``(q - 8) * scale + zero`` with float ``zero``; ours is
``(q - z) * s`` with integer-valued ``z``, so ``scale = s`` and ``zero = (8 - z) * s``
(``scales_and_zeros``). Scales, zeros and activations share one dtype in the kernel, and it is
vectorised for bfloat16 only (float32 runs a scalar loop, ~14x slower here): the kernel runs in
bfloat16, whatever the model's dtype, and the output is cast back.

The kernel's cost grows with the rows like a compute-bound GEMM's, so past ``MAX_ROWS`` rows
(prefill) dequantizing the codes once and running the float GEMM is faster: ``prefers_int4_kernel``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from glowq_fx.kernels import cpu_gemv
from glowq_fx.kernels.layout import whole_group_codes, zero_points

KERNELS = ("auto", "glowq", "aten")  # convert's choices: ours where it loads, ours, PyTorch's
KERNEL_DTYPE = torch.bfloat16  # PyTorch's kernel: activations, scales and zeros
GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the kernel is built for
ROWS_MULTIPLE = 16  # the kernel tiles output rows in blocks of 16 to 64
VECTORISED = ("AVX2", "AVX512")  # dispatch capabilities with a vectorised kernel
# Rows up to which the int4 kernel runs (decode and short prompts); past them dequantize + float32
# GEMM. On the 2-core AVX2 machine, 4096 x 4096: the kernel took 1.36 ms at 1 row, 2.76 at 4 and
# 307 at 512, where the float32 GEMM took 145; the crossover itself is not measured precisely.
MAX_ROWS = 16


def _kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def capability() -> str:
    """The instruction set PyTorch's CPU kernels dispatch to in this process (``AVX2``, ...)."""
    return torch.backends.cpu.get_cpu_capability()


def chosen_kernel(kernel: str = "auto") -> str:
    """The kernel ``kernel`` ("auto", "glowq", "aten") stands for here: "auto" is ours where it
    loads, else PyTorch's; "glowq" raises where ours cannot load, saying why."""
    if kernel not in KERNELS:
        raise ValueError(f"CPU kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "aten":
        return kernel
    why = cpu_gemv.unavailable_reason()
    if why is not None and kernel == "glowq":
        raise RuntimeError(f"glowq's CPU GEMV is not available here: {why}")
    return "aten" if why is not None else "glowq"


def unsupported_reason(out_features: int, group_size: int, kernel: str = "auto") -> str | None:
    """Why a packed linear cannot run a CPU int4 kernel on this machine, or None when it can.
    (An ``in_features`` that is not a multiple of the group size is no obstacle: the kernels read
    the padded codes, and the activations are padded with zeros.)"""
    if chosen_kernel(kernel) == "glowq":
        if group_size % cpu_gemv.BLOCK:
            return f"group size {group_size} (the CPU GEMV takes multiples of {cpu_gemv.BLOCK})"
        return None
    return _aten_unsupported_reason(out_features, group_size)


def _aten_unsupported_reason(out_features: int, group_size: int) -> str | None:
    if not _kernel_available():
        return f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu"
    if capability() not in VECTORISED:
        return (f"this CPU's PyTorch kernels dispatch to {capability()}, where the int4 kernel is not vectorised "
                "(it needs AVX2 or AVX-512)")
    if group_size not in GROUP_SIZES:
        return f"group size {group_size} (the CPU int4 kernel takes {', '.join(map(str, GROUP_SIZES))})"
    if out_features % ROWS_MULTIPLE:
        return f"out_features {out_features} is not a multiple of {ROWS_MULTIPLE}"
    return None


def scales_and_zeros(scales: Tensor, zeros: Tensor) -> Tensor:
    """The kernel's (n_groups, N, 2) ``[scale, zero]`` for our ``(q - z) * s``: ``zero = (8 - z) s``,
    computed in float32 and rounded once to the kernel's dtype."""
    s = scales.float()
    return torch.stack([s, (8.0 - zero_points(zeros)) * s], dim=-1).to(KERNEL_DTYPE).contiguous()


def convert(qweight: Tensor, scales: Tensor, zeros: Tensor, kernel: str = "auto") -> tuple[Tensor, Tensor]:
    """(weight in the chosen kernel's layout for this process's CPU, its scales and zeros)."""
    if chosen_kernel(kernel) == "glowq":
        return cpu_gemv.convert(qweight, scales, zeros)
    codes = whole_group_codes(qweight, scales).T.contiguous()  # (N, whole groups), as the converter takes them
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return weight, scales_and_zeros(scales, zeros)


def kernel_of(scales_zeros: Tensor) -> str:
    """Which kernel's layout a converted weight is in, told by its parameters' dtype."""
    return "glowq" if scales_zeros.dtype == torch.float32 else "aten"


def prefers_int4_kernel(rows: int, scales_zeros: Tensor) -> bool:
    """True where the int4 kernel beats dequantize + GEMM (``rows`` may be symbolic: a guard)."""
    return rows <= (cpu_gemv.MAX_ROWS if kernel_of(scales_zeros) == "glowq" else MAX_ROWS)


def int4_matmul(x: Tensor, weight: Tensor, scales_zeros: Tensor, group_size: int) -> Tensor:
    """``x deq(W)^T`` in ``x``'s dtype through the kernel whose layout ``weight`` is in (PyTorch's
    runs in bfloat16); ``weight`` holds ``K_pad >= K`` columns, the last ones multiplied by zeros."""
    if kernel_of(scales_zeros) == "glowq":
        return cpu_gemv.matmul(x, weight, scales_zeros, group_size)
    K, K_pad = x.shape[-1], 2 * weight.shape[1]
    x2 = x.reshape(-1, K).to(KERNEL_DTYPE)
    x2 = (F.pad(x2, (0, K_pad - K)) if K_pad != K else x2).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, group_size, scales_zeros)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
