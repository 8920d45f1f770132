"""W4A16 matmul with GlowQ's low-rank epilogue, in Triton.

``y_i = x deq(W_i)^T + R A_i^T (+ b_i)`` for up to ``MAX_MEMBERS`` linears that read the same
``x``, in one launch (horizontal fusion: the programs of one launch cover the column blocks of
all members, each program finds its member from its column-block index). ``R = x B^T`` is the
group's shared projection, computed once before the launch; the ``R A_i^T`` term is added to
the accumulator in the epilogue, so the uncorrected output is never written or re-read.

Three paths, chosen on the number of rows ``M`` (tokens):

- ``M == 1`` (decode): a GEMV. The weight tile is loaded as ``BLOCK_K / 8`` rows of int32 words
  and unpacked into a ``(BLOCK_K / 8, 8, BLOCK_N)`` register tile, so every word is loaded
  once; the products are summed per scale group and scaled there,
  ``s * (sum_k x_k q_k - z * sum_k x_k)``, instead of dequantizing every weight. With
  ``SPLIT_K > 1`` each column block gets ``SPLIT_K`` programs over disjoint K ranges; the last to
  finish adds their float32 partials (in a fixed order) and runs the epilogue, in the same launch.
  As a candidate, the GEMV can also make ``R`` itself (``gemv_projected_kernel``): a separate
  launch for ``R`` is a serial step the GEMV waits for at decode, so here the first programs to
  start compute ``R`` while the others run their K loops and wait for it only in their epilogue
  (a bounded wait, then they compute ``R`` themselves: nothing can hang).
- ``2 <= M <= 16`` (a decode batch), as a candidate: the same GEMV over ``BLOCK_M`` rows at
  once, every unpacked weight tile serving all of them. The launcher times it against the GEMM
  below once per shape.
- ``M > 1``: a tensor-core GEMM (``tl.dot``) that dequantizes a ``BLOCK_K x BLOCK_N`` tile
  (``(q - z) * s`` in float32, rounded to the activation dtype like the eager module's ``W_q``)
  inside the K loop. Small ``M`` (<= 16) gets its own configurations: a 16-row tile and narrow
  column blocks, so a decode batch still spreads over every SM.

Weights are in the layout of ``glowq_fx.kernels.layout``; any group size that is a multiple of
8 works with any ``BLOCK_K`` (a tile that spans several groups loads one scale row per group).
The kernels know nothing of torch.library or Inductor: ``glowq_fx.ops`` launches them.

Under ``TRITON_INTERPRET=1`` (CPU tests) two interpreter limits show: its ``tl.dot`` multiplies
the raw bit patterns of bfloat16 operands, so launches set ``UPCAST_DOT`` there (the operands,
already rounded to bfloat16, are widened to float32 first); and its float32 -> bfloat16 cast
truncates instead of rounding, so bfloat16 results may be one unit in the last place off.
"""
from __future__ import annotations

import functools
import os

import triton
import triton.language as tl

MAX_MEMBERS = 4  # linears served by one launch; larger groups take several launches
SMALL_M = 16  # rows up to which the GEMM uses its decode-batch configurations
DEQUANT_MATMUL_MIN_M = 128  # from here on: dequantize to a buffer, then cuBLAS (compute-bound)


@triton.jit
def _pick(member, v0, v1, v2, v3):
    """``(v0, v1, v2, v3)[member]`` for a runtime member index, as selects (not branches), so
    the compiler keeps the alignment it knows of every candidate pointer / integer."""
    return tl.where(member == 3, v3, tl.where(member == 2, v2, tl.where(member == 1, v1, v0)))


@triton.jit
def _locate(pid, N0, N1, N2, BLOCK_N: tl.constexpr, NUM_MEMBERS: tl.constexpr):
    """(member, column-block index within the member) of column-block program ``pid``."""
    e1 = tl.cdiv(N0, BLOCK_N)
    e2 = e1 + tl.cdiv(N1, BLOCK_N)
    e3 = e2 + tl.cdiv(N2, BLOCK_N)
    member = pid * 0
    start = pid * 0
    if NUM_MEMBERS > 1:
        member += (pid >= e1).to(tl.int32)
        start = tl.where(pid >= e1, e1, start)
    if NUM_MEMBERS > 2:
        member += (pid >= e2).to(tl.int32)
        start = tl.where(pid >= e2, e2, start)
    if NUM_MEMBERS > 3:
        member += (pid >= e3).to(tl.int32)
        start = tl.where(pid >= e3, e3, start)
    return member, pid - start


@triton.jit
def _member_block(pid_n, W0, S0, Z0, Y0, N0, W1, S1, Z1, Y1, N1, W2, S2, Z2, Y2, N2, W3, S3, Z3, Y3, N3,
                  BLOCK_N: tl.constexpr, NUM_MEMBERS: tl.constexpr):
    """(member, its column offsets, weight / scale / zero / output pointers, N) of a program."""
    member, nb = _locate(pid_n, N0, N1, N2, BLOCK_N, NUM_MEMBERS)
    W = _pick(member, W0, W1, W2, W3)
    S = _pick(member, S0, S1, S2, S3)
    Z = _pick(member, Z0, Z1, Z2, Z3)
    Y = _pick(member, Y0, Y1, Y2, Y3)
    N = _pick(member, N0, N1, N2, N3)
    return member, nb * BLOCK_N + tl.arange(0, BLOCK_N), W, S, Z, Y, N


@triton.jit
def _finish_gemv(acc, row, offs_n, mask_n, R, stride_rm, member, A0, A1, A2, A3, BIAS0, BIAS1, BIAS2, BIAS3, Y, N,
                 RANK, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Epilogue of a column block's finished sum: ``+ A_i R`` and bias, then the one store."""
    if HAS_A:
        A = _pick(member, A0, A1, A2, A3)
        for r0 in range(0, RANK, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < RANK
            rv = tl.load(R + row * stride_rm + offs_r, mask=mask_r, other=0.0).to(tl.float32)
            a = tl.load(A + offs_n[None, :] * RANK + offs_r[:, None], mask=mask_r[:, None] & mask_n[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(a * rv[:, None], axis=0)
    if HAS_BIAS:
        BIAS = _pick(member, BIAS0, BIAS1, BIAS2, BIAS3)
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Y + row * N + offs_n, acc.to(Y.dtype.element_ty), mask=mask_n)


@triton.jit
def zero_points(z, Z):
    """float32 zero points from the loaded ``z``: uint8 ones hold 16 * zero (``kernels.layout``)."""
    if Z.dtype.element_ty == tl.uint8:
        z = z * 0.0625
    return z


@triton.jit
def _slab_indices(K, GROUP_SIZE: tl.constexpr, TILE_GROUPS: tl.constexpr, GROUP_ROWS: tl.constexpr):
    """(slab index, word row within a slab, word rows holding codes of the K columns) of the GEMVs
    (the padding past them, whole groups or a partial last one, is never read)."""
    return tl.arange(0, TILE_GROUPS), tl.arange(0, GROUP_ROWS), tl.cdiv(K, 8)  # the words K's codes fill


@triton.jit
def _word_tile(W, k0, t, r, offs_n, mask_n, N, words_per_col, GROUP_ROWS: tl.constexpr):
    """(word rows (TILE_GROUPS, GROUP_ROWS), int32 words (TILE_GROUPS, GROUP_ROWS, BLOCK_N)) of
    the GEMV's K tile from code ``k0``: one slab of ``GROUP_ROWS`` word rows per scale group."""
    rows = k0 // 8 + t[:, None] * GROUP_ROWS + r[None, :]
    words = tl.load(W + rows[:, :, None] * N + offs_n[None, None, :],
                    mask=(rows < words_per_col)[:, :, None] & mask_n[None, None, :], other=0)
    return rows, words


@triton.jit
def _group_scales(S, Z, k0, t, offs_n, mask_n, N, K, GROUP_SIZE: tl.constexpr, TILE_GROUP: tl.constexpr):
    """float32 (scales, zeros), each (TILE_GROUPS, BLOCK_N), of the GEMV's K tile from code ``k0``."""
    g = (k0 + t * TILE_GROUP) // GROUP_SIZE
    gmask = (k0 + t * TILE_GROUP < K)[:, None] & mask_n[None, :]
    s = tl.load(S + g[:, None] * N + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
    z = tl.load(Z + g[:, None] * N + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
    z = zero_points(z, Z)
    return s, z


@triton.jit
def _gemv_columns(x_row, W, S, Z, k_begin, k_end, offs_n, mask_n, N, K, GROUP_SIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_GROUP: tl.constexpr):
    """float32 (BLOCK_N,): one row of ``x`` times columns ``offs_n`` of ``deq(W)^T`` over codes
    ``[k_begin, k_end)`` (whole K tiles), the one-row GEMVs' K loop."""
    # The K tile is (TILE_GROUPS, TILE_GROUP / 8, BLOCK_N) words: one slab per scale group
    # (TILE_GROUP = the group size, a power of two; for per-channel scales any power of two),
    # so products are summed per group and scaled once, and no tensor needs a reshape.
    TILE_GROUPS: tl.constexpr = BLOCK_K // TILE_GROUP
    GROUP_ROWS: tl.constexpr = TILE_GROUP // 8
    t, r, words_per_col = _slab_indices(K, GROUP_SIZE, TILE_GROUPS, GROUP_ROWS)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        rows, words = _word_tile(W, k0, t, r, offs_n, mask_n, N, words_per_col, GROUP_ROWS)
        kx = rows * 8  # column of the lowest code of each word
        dots = tl.zeros([TILE_GROUPS, GROUP_ROWS, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([TILE_GROUPS, GROUP_ROWS], dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_row + kx + j, mask=kx + j < K, other=0.0).to(tl.float32)
            dots += ((words >> (4 * j)) & 0xF).to(tl.float32) * xj[:, :, None]
            xsum += xj
        s, z = _group_scales(S, Z, k0, t, offs_n, mask_n, N, K, GROUP_SIZE, TILE_GROUP)
        acc += tl.sum(s * (tl.sum(dots, axis=1) - z * tl.sum(xsum, axis=1)[:, None]), axis=0)
    return acc


@triton.jit
def projection_rows(x_row, B, stride_bk, offs_r, mask_r, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 (BLOCK_R,): rows ``offs_r`` of ``R = x B^T`` for one row of ``x``, streaming K in
    ``BLOCK_K`` tiles with a (BLOCK_R, BLOCK_K) partial, summed across lanes once at the end."""
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < K
        xk = tl.load(x_row + kk, mask=mask_k, other=0.0).to(tl.float32)
        b = tl.load(B + offs_r[:, None] * stride_bk + kk[None, :], mask=mask_r[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        acc += b * xk[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _store_rows(acc, offs_m, mask_m, offs_n, mask_n, member, BIAS0, BIAS1, BIAS2, BIAS3, Y, N,
                HAS_BIAS: tl.constexpr):
    """Last step of a (rows, columns) block of the several-row kernels: bias, then the one store."""
    if HAS_BIAS:
        BIAS = _pick(member, BIAS0, BIAS1, BIAS2, BIAS3)
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * N + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _w4a16_gemv_kernel(
    X, R, stride_xm, stride_rm, M, K, RANK, WS, COUNTERS, WS_STRIDE,
    W0, S0, Z0, A0, BIAS0, Y0, N0,
    W1, S1, Z1, A1, BIAS1, Y1, N1,
    W2, S2, Z2, A2, BIAS2, Y2, N2,
    W3, S3, Z3, A3, BIAS3, Y3, N3,
    NUM_MEMBERS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, TILE_GROUP: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    split = tl.program_id(2)
    member, offs_n, W, S, Z, Y, N = _member_block(pid_n, W0, S0, Z0, Y0, N0, W1, S1, Z1, Y1, N1, W2, S2, Z2, Y2, N2,
                                                  W3, S3, Z3, Y3, N3, BLOCK_N, NUM_MEMBERS)
    mask_n = offs_n < N
    x_row = X + row * stride_xm
    # split-K: program ``split`` covers whole K tiles [k_begin, k_end); the last may be empty
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = split * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    acc = _gemv_columns(x_row, W, S, Z, k_begin, k_end, offs_n, mask_n, N, K, GROUP_SIZE, BLOCK_N, BLOCK_K,
                        TILE_GROUP)

    if SPLIT_K == 1:
        _finish_gemv(acc, row, offs_n, mask_n, R, stride_rm, member, A0, A1, A2, A3, BIAS0, BIAS1, BIAS2, BIAS3, Y, N,
                     RANK, HAS_A, HAS_BIAS, BLOCK_R)
    else:
        # Each split stores its float32 partial; the last of the column block's programs to
        # arrive (a counter, zeroed by the launcher) adds the partials up in split order, so the
        # result does not depend on arrival order, runs the epilogue once and writes the output.
        # It then puts the counter back to zero, so repeated launches on one buffer (the
        # autotuner's timing runs) stay right. The barrier makes every thread's partial stores
        # precede the release of the counter increment.
        ws_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(WS + (split * M + row) * WS_STRIDE + ws_cols, acc)
        tl.debug_barrier()
        counter = COUNTERS + row * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s_idx in tl.static_range(SPLIT_K):
                # .cg: read from L2, where the other programs' stores are, never a stale L1 line
                total += tl.load(WS + (s_idx * M + row) * WS_STRIDE + ws_cols, cache_modifier=".cg")
            _finish_gemv(total, row, offs_n, mask_n, R, stride_rm, member, A0, A1, A2, A3, BIAS0, BIAS1, BIAS2, BIAS3,
                         Y, N, RANK, HAS_A, HAS_BIAS, BLOCK_R)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def _w4a16_gemv_projected_kernel(
    X, B, RBUF, SYNC, stride_xm, stride_bk, M, K, RANK,
    W0, S0, Z0, A0, BIAS0, Y0, N0,
    W1, S1, Z1, A1, BIAS1, Y1, N1,
    W2, S2, Z2, A2, BIAS2, Y2, N2,
    W3, S3, Z3, A3, BIAS3, Y3, N3,
    NUM_MEMBERS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, TILE_GROUP: tl.constexpr,
    PRODUCERS: tl.constexpr, PRODUCER_R: tl.constexpr, BLOCK_KP: tl.constexpr, SPIN_LIMIT: tl.constexpr,
):
    # The one-row GEMV with the group's R = x B^T made in the same launch. Each row has
    # PRODUCERS + column-block programs; a program's role is its ticket, the order in which it
    # started (an atomic counter), not its id: the first PRODUCERS to start each compute
    # PRODUCER_R entries of R into RBUF and count themselves done; the others run a column block's
    # K loop and only then wait for R. A waiting program started after every producer had, and
    # started programs run to completion, so the wait ends; it is still bounded (SPIN_LIMIT
    # polls), after which the program computes R itself, as it does with PRODUCERS = 0: nothing
    # can hang. The last program to finish puts the row's three counters back to zero, so that
    # repeated launches on one buffer (the autotuner's timing runs) start afresh.
    row = tl.program_id(1)
    x_row = X + row * stride_xm
    tickets, done_count, finished = SYNC + 3 * row, SYNC + 3 * row + 1, SYNC + 3 * row + 2
    if PRODUCERS > 0:
        ticket = tl.atomic_add(tickets, 1, sem="relaxed", scope="gpu")
    else:
        ticket = tl.program_id(0)
    if ticket < PRODUCERS:
        offs_r = ticket * PRODUCER_R + tl.arange(0, PRODUCER_R)
        mask_r = offs_r < RANK
        r = projection_rows(x_row, B, stride_bk, offs_r, mask_r, K, PRODUCER_R, BLOCK_KP)
        tl.store(RBUF + row * RANK + offs_r, r.to(RBUF.dtype.element_ty), mask=mask_r)
        tl.debug_barrier()  # every thread's stores before the release below
        tl.atomic_add(done_count, 1, sem="release", scope="gpu")
    else:
        member, offs_n, W, S, Z, Y, N = _member_block(ticket - PRODUCERS, W0, S0, Z0, Y0, N0, W1, S1, Z1, Y1, N1,
                                                      W2, S2, Z2, Y2, N2, W3, S3, Z3, Y3, N3, BLOCK_N, NUM_MEMBERS)
        mask_n = offs_n < N
        acc = _gemv_columns(x_row, W, S, Z, 0, K, offs_n, mask_n, N, K, GROUP_SIZE, BLOCK_N, BLOCK_K, TILE_GROUP)
        ready = ticket * 0
        if PRODUCERS > 0:
            done = tl.atomic_add(done_count, 0, sem="acquire", scope="gpu")
            spins = ticket * 0
            while (done < PRODUCERS) & (spins < SPIN_LIMIT):
                done = tl.atomic_add(done_count, 0, sem="acquire", scope="gpu")
                spins += 1
            ready = (done >= PRODUCERS).to(tl.int32)
        A = _pick(member, A0, A1, A2, A3)
        for r0 in range(0, RANK, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < RANK
            if ready != 0:  # .cg: from L2, where the producers' stores are
                rv = tl.load(RBUF + row * RANK + offs_r, mask=mask_r, other=0.0, cache_modifier=".cg")
            else:  # no producers, or they were not done in time: this program's own R
                rv = projection_rows(x_row, B, stride_bk, offs_r, mask_r, K, BLOCK_R, BLOCK_KP).to(
                    RBUF.dtype.element_ty)
            a = tl.load(A + offs_n[None, :] * RANK + offs_r[:, None], mask=mask_r[:, None] & mask_n[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(a * rv.to(tl.float32)[:, None], axis=0)
        _finish_gemv(acc, row, offs_n, mask_n, RBUF, RANK, member, A0, A1, A2, A3, BIAS0, BIAS1, BIAS2, BIAS3, Y, N,
                     RANK, False, HAS_BIAS, BLOCK_R)
    if PRODUCERS > 0:
        if tl.atomic_add(finished, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
            tl.atomic_xchg(tickets, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(done_count, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(finished, 0, sem="relaxed", scope="gpu")


@triton.jit
def _w4a16_rows_gemv_kernel(
    X, R, stride_xm, stride_rm, M, K, RANK,
    W0, S0, Z0, A0, BIAS0, Y0, N0,
    W1, S1, Z1, A1, BIAS1, Y1, N1,
    W2, S2, Z2, A2, BIAS2, Y2, N2,
    W3, S3, Z3, A3, BIAS3, Y3, N3,
    NUM_MEMBERS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    TILE_GROUP: tl.constexpr,
):
    # The one-row GEMV's K loop for BLOCK_M rows at once: each weight tile is loaded and
    # unpacked once and serves every row (the products get a leading row axis), so a decode
    # batch of a few sequences reads the weights once, without the tensor-core GEMM's 16-row
    # tile or its per-element dequantization.
    TILE_GROUPS: tl.constexpr = BLOCK_K // TILE_GROUP
    GROUP_ROWS: tl.constexpr = TILE_GROUP // 8
    pid_n = tl.program_id(0)
    member, offs_n, W, S, Z, Y, N = _member_block(pid_n, W0, S0, Z0, Y0, N0, W1, S1, Z1, Y1, N1, W2, S2, Z2, Y2, N2,
                                                  W3, S3, Z3, Y3, N3, BLOCK_N, NUM_MEMBERS)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    mask_n = offs_n < N
    t, r, words_per_col = _slab_indices(K, GROUP_SIZE, TILE_GROUPS, GROUP_ROWS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_rows = X + offs_m[:, None, None] * stride_xm  # (BLOCK_M, 1, 1)
    for k0 in range(0, K, BLOCK_K):
        rows, words = _word_tile(W, k0, t, r, offs_n, mask_n, N, words_per_col, GROUP_ROWS)
        kx = rows[None, :, :] * 8  # (1, TILE_GROUPS, GROUP_ROWS)
        dots = tl.zeros([BLOCK_M, TILE_GROUPS, GROUP_ROWS, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_M, TILE_GROUPS, GROUP_ROWS], dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_rows + kx + j, mask=mask_m[:, None, None] & (kx + j < K), other=0.0).to(tl.float32)
            dots += ((words >> (4 * j)) & 0xF).to(tl.float32)[None, :, :, :] * xj[:, :, :, None]
            xsum += xj
        s, z = _group_scales(S, Z, k0, t, offs_n, mask_n, N, K, GROUP_SIZE, TILE_GROUP)
        acc += tl.sum(s[None, :, :] * (tl.sum(dots, axis=2) - z[None, :, :] * tl.sum(xsum, axis=2)[:, :, None]),
                      axis=1)

    if HAS_A:
        A = _pick(member, A0, A1, A2, A3)
        for r0 in range(0, RANK, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < RANK
            rv = tl.load(R + offs_m[:, None] * stride_rm + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                         other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_R)
            a = tl.load(A + offs_n[None, :] * RANK + offs_r[:, None], mask=mask_r[:, None] & mask_n[None, :],
                        other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_N)
            acc += tl.sum(rv[:, :, None] * a[None, :, :], axis=1)
    _store_rows(acc, offs_m, mask_m, offs_n, mask_n, member, BIAS0, BIAS1, BIAS2, BIAS3, Y, N, HAS_BIAS)


@triton.jit
def dequantize_kernel(W, S, Z, OUT, N, K, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``OUT (K, N) = (q - z) * s`` in the activation dtype: the weight for a cuBLAS prefill."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (kk[:, None] < K) & (offs_n[None, :] < N)
    words = tl.load(W + (kk[:, None] // 8) * N + offs_n[None, :], mask=mask, other=0)
    q = ((words >> ((kk[:, None] % 8) * 4)) & 0xF).to(tl.float32)
    g = kk // GROUP_SIZE
    s = tl.load(S + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    z = zero_points(z, Z)
    tl.store(OUT + kk[:, None] * N + offs_n[None, :], ((q - z) * s).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def w4a16_tile(X, W, S, Z, offs_m, mask_m, offs_n, mask_n, stride_xm, K, N, GROUP_SIZE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """float32 ``x deq(W)^T`` of rows ``offs_m`` and columns ``offs_n``: the tensor-core K loop of the
    GEMMs (dense and grouped experts), each (BLOCK_K, BLOCK_N) weight tile dequantized in registers."""
    shifts = (tl.arange(0, BLOCK_K) % 8) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < K),
                    other=0.0)
        wmask = (kk[:, None] < K) & mask_n[None, :]  # the padding columns (a=0 there) are never read
        words = tl.load(W + (kk[:, None] // 8) * N + offs_n[None, :], mask=wmask, other=0)
        q = ((words >> shifts[:, None]) & 0xF).to(tl.float32)  # (BLOCK_K, BLOCK_N)
        if BLOCK_K <= GROUP_SIZE:
            g = k0 // GROUP_SIZE
            s = tl.load(S + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            z = tl.load(Z + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            z = zero_points(z, Z)
        else:
            g = kk // GROUP_SIZE
            s = tl.load(S + g[:, None] * N + offs_n[None, :], mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(Z + g[:, None] * N + offs_n[None, :], mask=wmask, other=0.0).to(tl.float32)
            z = zero_points(z, Z)
        w = ((q - z) * s).to(X.dtype.element_ty)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def low_rank_epilogue(acc, R, A, offs_m, mask_m, offs_n, mask_n, stride_rm, RANK, BLOCK_R: tl.constexpr,
                      UPCAST_DOT: tl.constexpr):
    """``acc + R A^T`` on the tile: the correction's rows of ``R`` times ``A`` (N, RANK)."""
    for r0 in range(0, RANK, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < RANK
        rr = tl.load(R + offs_m[:, None] * stride_rm + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                     other=0.0)
        at = tl.load(A + offs_n[None, :] * RANK + offs_r[:, None], mask=mask_r[:, None] & mask_n[None, :],
                     other=0.0)
        if UPCAST_DOT:
            rr = rr.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(rr, at, acc)
    return acc


@triton.jit
def _w4a16_gemm_kernel(
    X, R, stride_xm, stride_rm, M, K, RANK,
    W0, S0, Z0, A0, BIAS0, Y0, N0,
    W1, S1, Z1, A1, BIAS1, Y1, N1,
    W2, S2, Z2, A2, BIAS2, Y2, N2,
    W3, S3, Z3, A3, BIAS3, Y3, N3,
    NUM_MEMBERS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # row blocks vary fastest, so programs that run together dequantize the same weight tile
    # and it stays in L2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    member, offs_n, W, S, Z, Y, N = _member_block(pid_n, W0, S0, Z0, Y0, N0, W1, S1, Z1, Y1, N1, W2, S2, Z2, Y2, N2,
                                                  W3, S3, Z3, Y3, N3, BLOCK_N, NUM_MEMBERS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = w4a16_tile(X, W, S, Z, offs_m, mask_m, offs_n, mask_n, stride_xm, K, N, GROUP_SIZE, BLOCK_M, BLOCK_N,
                     BLOCK_K, UPCAST_DOT)
    if HAS_A:
        acc = low_rank_epilogue(acc, R, _pick(member, A0, A1, A2, A3), offs_m, mask_m, offs_n, mask_n, stride_rm, RANK,
                                BLOCK_R, UPCAST_DOT)
    _store_rows(acc, offs_m, mask_m, offs_n, mask_n, member, BIAS0, BIAS1, BIAS2, BIAS3, Y, N, HAS_BIAS)


def _config(block_n, block_k, warps, stages=None, block_m=None, block_r=32, split_k=None):
    kwargs = {"BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_R": block_r}
    if block_m is not None:
        kwargs["BLOCK_M"] = block_m
    if split_k is not None:
        kwargs["SPLIT_K"] = split_k
    return triton.Config(kwargs, num_warps=warps, **({} if stages is None else {"num_stages": stages}))


# Memory-bound paths want many programs with many loads in flight; the prefill GEMM wants
# large tiles. Short lists: every configuration costs a compile on first use.
# Measured on the H100 (benchmarks/tune_w4a16.py): the GEMV is latency-bound without split-K,
# so the K tile must be long (1024-2048 codes) to keep enough bytes in flight per program, and
# the column block narrow (16-32) to spread over every SM; the small-M GEMM prefers narrow
# column blocks too; large M goes through dequantize + cuBLAS (DEQUANT_MATMUL_MIN_M).
GEMV_CONFIGS = [
    _config(32, 1024, 4, split_k=1), _config(16, 1024, 4, split_k=1), _config(32, 2048, 4, split_k=1),
    _config(16, 2048, 4, split_k=1), _config(64, 1024, 8, split_k=1), _config(32, 2048, 8, split_k=1),
]
# Split-K puts SPLIT_K programs on each column block, so more weight bytes are in flight at once
# without a longer K tile; the launcher times it against GEMV_CONFIGS once per shape (it costs a
# counter memset and a float32 partial per split). The first entry, the one the interpreter runs,
# has a short K tile so that the CPU tests split K into several tiles.
SPLIT_K_CONFIGS = [
    _config(32, 256, 4, split_k=4), _config(32, 512, 4, split_k=4), _config(32, 1024, 4, split_k=2),
    _config(32, 1024, 4, split_k=4), _config(64, 512, 4, split_k=4), _config(16, 1024, 4, split_k=2),
    _config(32, 512, 4, split_k=8),
]
# The one-launch GEMV with R made inside (``_w4a16_gemv_projected_kernel``): the plain GEMV's
# tiles; the launcher times it against R's own launch + the GEMV once per shape. The first entry,
# the one the interpreter runs, has a short K tile so that the CPU tests cross several.
PROJECTED_CONFIGS = [
    _config(32, 256, 4), _config(32, 1024, 4), _config(16, 1024, 4), _config(32, 2048, 4), _config(64, 1024, 8),
    _config(16, 2048, 4),
]
PRODUCER_R = 4  # entries of R per producer program: rank 64 makes 16 producers
PRODUCER_BLOCK_K = 512  # the producers' K tile (and a consumer's, computing R itself)
SPIN_LIMIT = 1 << 14  # polls of the producers' counter before a consumer computes R itself
# The several-row GEMV (BLOCK_M rows, chosen by the launcher) holds BLOCK_M times the one-row
# kernel's products in registers, so shorter K tiles or more warps. Not yet timed on a GPU: the
# launcher times it against the small-M GEMM once per shape and keeps the faster (only if it
# agrees). The first entry, the one the interpreter runs, splits the tests' K into several tiles.
ROWS_GEMV_CONFIGS = [
    _config(32, 256, 4), _config(32, 512, 4), _config(16, 512, 4), _config(32, 1024, 8),
    _config(16, 1024, 8), _config(64, 512, 8),
]
ROWS_GEMV_MAX_BLOCK_M = 8  # rows per program; more rows take more programs
SMALL_M_CONFIGS = [
    _config(32, 128, 4, 3, block_m=16), _config(32, 256, 4, 3, block_m=16), _config(16, 256, 4, 3, block_m=16),
    _config(64, 128, 4, 3, block_m=16), _config(16, 512, 4, 3, block_m=16),
]
GEMM_CONFIGS = [
    _config(128, 64, 8, 4, block_m=128, block_r=64), _config(64, 64, 8, 3, block_m=128, block_r=64),
    _config(128, 32, 4, 3, block_m=64, block_r=32), _config(64, 64, 4, 3, block_m=64, block_r=32),
]
AUTOTUNE_KEY = ["M", "K", "N0", "N1", "N2", "N3", "RANK"]


GEMV_MIN_BLOCK_K = min(c.kwargs["BLOCK_K"] for c in GEMV_CONFIGS + SPLIT_K_CONFIGS + ROWS_GEMV_CONFIGS)


def tile_group(group_size: int, n_groups: int) -> int:
    """The GEMVs' ``TILE_GROUP``: the codes summed before one scale is applied. It must divide
    the group size (a slab never straddles two groups) and every configuration's ``BLOCK_K``
    (all powers of two): the largest power of two dividing ``group_size``, at most
    ``GEMV_MIN_BLOCK_K``. With one group (per-channel scales, ``group_size`` = K_pad, any
    multiple of 8) no slab can straddle, so at least 32 codes."""
    tile = min(group_size & -group_size, GEMV_MIN_BLOCK_K)
    return max(tile, 32) if n_groups == 1 else tile


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read by
    ``triton.jit`` when this module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotuned_key(kernel, configs, key):
    # the interpreter cannot time configurations: it runs the first one
    return triton.autotune(configs=configs[:1] if interpreting() else configs, key=key)(kernel)


def _autotuned(kernel, configs):
    return _autotuned_key(kernel, configs, AUTOTUNE_KEY)


@functools.lru_cache(maxsize=None)
def split_k_buffers(Ns: tuple[int, ...]) -> tuple[int, int, int]:
    """(workspace row stride, counters per row, largest SPLIT_K) that ``gemv_split_k_kernel``
    needs for members of ``Ns`` columns under any of its configurations: a program's partial
    lands at column ``pid_n * BLOCK_N`` of a workspace row, its counter at ``pid_n``."""
    widths = [sum(triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_N"] for n in Ns) for c in SPLIT_K_CONFIGS]
    blocks = [sum(triton.cdiv(n, c.kwargs["BLOCK_N"]) for n in Ns) for c in SPLIT_K_CONFIGS]
    return max(widths), max(blocks), max(c.kwargs["SPLIT_K"] for c in SPLIT_K_CONFIGS)


gemv_kernel = _autotuned(_w4a16_gemv_kernel, GEMV_CONFIGS)
gemv_split_k_kernel = _autotuned(_w4a16_gemv_kernel, SPLIT_K_CONFIGS)
gemv_projected_kernel = _autotuned(_w4a16_gemv_projected_kernel, PROJECTED_CONFIGS)
rows_gemv_kernel = _autotuned(_w4a16_rows_gemv_kernel, ROWS_GEMV_CONFIGS)
small_m_kernel = _autotuned(_w4a16_gemm_kernel, SMALL_M_CONFIGS)
gemm_kernel = _autotuned(_w4a16_gemm_kernel, GEMM_CONFIGS)
