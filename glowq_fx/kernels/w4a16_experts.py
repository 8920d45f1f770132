"""The grouped Triton kernels of an MoE block's experts: rows sorted by expert, one launch each.

Rows ``offsets[e-1]:offsets[e]`` of ``x`` (M, K) belong to expert ``e``; its 4-bit weight is
``qweight[e]`` (K_pad / 8, N) in the layout of ``kernels.layout`` (stacked (E, ...), as are the
scales, zero points, biases and ``A``). Each program computes one ``BLOCK_M x BLOCK_N`` tile of
one expert's rows: the launcher numbers every expert's row tiles one after another
(``TILE_ENDS[e]``: the tiles of experts ``0..e``) and launches the most tiles any routing can
need (``cdiv(M, BLOCK_M) + E``), so no count is read back to the host; a program past the last
tile returns at once, and an expert with no rows has no tile. The epilogue adds the expert's
correction ``R A_e^T`` (``R``: the rows of the shared projection) and bias, as the dense GEMM
does; rows past ``offsets[-1]`` are never written (the launcher zero-fills the output). Where
GlowQ-S kept the correction of some experts only, ``A`` holds those experts' factors and
``SLOTS[e]`` is expert ``e``'s row of it (-1: none, its tile skips the epilogue).

The experts' own right factors (``B`` (E, r, K), for weights that read each expert's own
intermediate) get the same tiling: ``R`` of each expert's rows is ``x B_e^T``, one launch, where a
loop over experts would read the offsets back to the host (a sync, which CUDA graphs cannot capture).
"""
from __future__ import annotations

import triton
import triton.language as tl

from glowq_fx.kernels.w4a16 import _autotuned_key, _config, low_rank_epilogue, w4a16_tile


@triton.jit
def _expert_tile(pid_t, OFFSETS, TILE_ENDS, E, BLOCK_M: tl.constexpr):
    """(expert, its rows in this tile, their mask) of row tile ``pid_t``; expert ``E`` (no rows)
    for a program past the last tile."""
    # how many experts' tiles end at or before this one
    e = pid_t * 0  # an int32 scalar from the start: a loop-carried variable keeps its type when compiled
    for i in range(0, E):
        e += (tl.load(TILE_ENDS + i) <= pid_t).to(tl.int32)
    first_tile = tl.where(e > 0, tl.load(TILE_ENDS + e - 1, mask=(e > 0) & (e <= E), other=0), 0)
    start = tl.where(e > 0, tl.load(OFFSETS + e - 1, mask=(e > 0) & (e <= E), other=0), 0)
    end = tl.load(OFFSETS + e, mask=e < E, other=0)
    offs_m = start + (pid_t - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    return e, offs_m, offs_m < end


@triton.jit
def _w4a16_experts_kernel(
    X, R, OFFSETS, TILE_ENDS, stride_xm, stride_rm, K, N, RANK, E,
    W, S, Z, A, SLOTS, BIAS, Y, stride_we, stride_se, stride_ae,
    GROUP_SIZE: tl.constexpr, HAS_A: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, offs_m, mask_m = _expert_tile(pid_t, OFFSETS, TILE_ENDS, E, BLOCK_M)
    if e < E:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = w4a16_tile(X, W + e * stride_we, S + e * stride_se, Z + e * stride_se, offs_m, mask_m, offs_n, mask_n,
                         stride_xm, K, N, GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_DOT)
        if HAS_A:
            slot = e
            if HAS_SLOTS:  # A holds the corrected experts only: this one's row, or -1
                slot = tl.load(SLOTS + e)
            if slot >= 0:
                acc = low_rank_epilogue(acc, R, A + slot * stride_ae, offs_m, mask_m, offs_n, mask_n, stride_rm, RANK,
                                        BLOCK_R, UPCAST_DOT)
        if HAS_BIAS:
            acc += tl.load(BIAS + e * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * N + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _experts_projection_kernel(
    X, B, OFFSETS, TILE_ENDS, SLOTS, R, stride_xm, stride_rm, K, RANK, E, stride_be,
    HAS_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # R[rows of e] = x[rows of e] B_e^T: one (BLOCK_M, BLOCK_R) tile of one expert's rows per
    # program, numbered as the experts kernel numbers its tiles (no count read back to the host)
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    e, offs_m, mask_m = _expert_tile(pid_t, OFFSETS, TILE_ENDS, E, BLOCK_M)
    slot = e
    if HAS_SLOTS:  # B holds the corrected experts only: this one's row, or -1 (its rows stay zero)
        slot = tl.load(SLOTS + e, mask=e < E, other=-1)
    if (e < E) & (slot >= 0):
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < RANK
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask_k = kk < K
            a = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            bt = tl.load(B + slot * stride_be + offs_r[None, :] * K + kk[:, None],
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # (BLOCK_K, BLOCK_R): B_e^T
            if UPCAST_DOT:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(a, bt, acc)
        tl.store(R + offs_m[:, None] * stride_rm + offs_r[None, :], acc.to(R.dtype.element_ty),
                 mask=mask_m[:, None] & mask_r[None, :])


# BLOCK_M is the launcher's (it numbers the tiles); these tune the rest. The first entry, the one
# the interpreter runs, has short K tiles so that the CPU tests cross several of them.
EXPERTS_CONFIGS = [
    _config(32, 64, 4, 3), _config(64, 64, 4, 3), _config(128, 64, 8, 3), _config(32, 128, 4, 3),
    _config(64, 128, 8, 4),
]
EXPERTS_KEY = ["K", "N", "RANK", "E", "BLOCK_M"]
experts_kernel = _autotuned_key(_w4a16_experts_kernel, EXPERTS_CONFIGS, EXPERTS_KEY)


def _projection_config(block_r, block_k, warps, stages):
    return triton.Config({"BLOCK_R": block_r, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)


# the rank is small (16-128): a few column tiles, long K tiles. The first entry is the one the
# interpreter runs, with short K tiles so that the CPU tests cross several of them.
PROJECTION_CONFIGS = [
    _projection_config(16, 64, 4, 3), _projection_config(32, 128, 4, 3), _projection_config(64, 128, 4, 3),
    _projection_config(32, 256, 8, 3), _projection_config(64, 64, 4, 4),
]
PROJECTION_KEY = ["K", "RANK", "E", "BLOCK_M"]
projection_kernel = _autotuned_key(_experts_projection_kernel, PROJECTION_CONFIGS, PROJECTION_KEY)


def experts_block_m(rows: int, experts: int) -> int:
    """Rows per tile: the average rows per expert rounded up to a power of two, 16 to 64 (tensor
    cores want 16 at least; decode gives each expert a row or two)."""
    mean = max(1, rows // max(experts, 1))
    return min(64, max(16, triton.next_power_of_2(mean)))
