"""GlowQ's shared projection ``R = x B^T`` for a few rows (decode), in Triton.

``B`` is thin (``rank x K``, a few hundred KB), so at one row the product is a GEMV whose cost is
latency, not bytes: cuBLAS serves it with a generic skinny-GEMM kernel (about 7 us per group on
the H100, measured as the difference between the corrected and uncorrected group launches, see
``benchmarks/results/w4a16_gpu.md``). Here each program owns ``BLOCK_R`` rows of ``B`` and one
row of ``x`` and streams ``K`` in long tiles, keeping a ``(BLOCK_R, BLOCK_K)`` float32 partial so
the cross-lane sum happens once, after the loop; one launch, no reduction pass. ``glowq_fx.ops``
times it against cuBLAS once per shape and keeps the faster.
"""
from __future__ import annotations

import triton
import triton.language as tl

from glowq_fx.kernels.w4a16 import interpreting, projection_rows

MAX_ROWS = 16  # rows of x up to which the launcher considers this kernel


@triton.jit
def _projection_gemv_kernel(X, B, R, K, RANK, stride_xm, stride_bk, stride_rm,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    row = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < RANK
    r = projection_rows(X + row * stride_xm, B, stride_bk, offs_r, mask_r, K, BLOCK_R, BLOCK_K)
    tl.store(R + row * stride_rm + offs_r, r.to(R.dtype.element_ty), mask=mask_r)


def _config(block_r, block_k, warps):
    return triton.Config({"BLOCK_R": block_r, "BLOCK_K": block_k}, num_warps=warps)


# Few rows of B per program so that rank 64 still makes 16-64 programs, long K tiles so each has
# many bytes in flight. The first entry is the one the interpreter runs.
CONFIGS = [
    _config(4, 512, 4), _config(1, 2048, 4), _config(2, 1024, 4), _config(4, 1024, 4), _config(8, 512, 4),
    _config(2, 2048, 8), _config(1, 4096, 8),
]

projection_gemv_kernel = triton.autotune(configs=CONFIGS[:1] if interpreting() else CONFIGS,
                                         key=["K", "RANK"])(_projection_gemv_kernel)
