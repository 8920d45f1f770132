"""Launching the Triton kernels: path by number of rows, per-launch scratch buffers, and the
run-time choice between equivalent paths (``fastest_path``).

``launch_w4a16`` serves every member of a group that reads one ``x``: below
``DEQUANT_MATMUL_MIN_M`` rows one launch per ``MAX_MEMBERS`` members of one kind (bias, correction,
group size), from there a dequantize + cuBLAS per member. ``launch_projection`` computes
``R = x B^T``. Both take checked inputs (``glowq_fx.ops`` checks them) and work on CPU tensors
under ``TRITON_INTERPRET=1``. The Triton modules are imported on first launch, so importing this
one needs no GPU and compiles nothing.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton

from glowq_fx.kernels.fastest_path import FASTEST
from glowq_fx.kernels.layout import group_size_of


def w4a16_forms(M: int) -> tuple[str, ...]:
    """Which kernel forms can serve ``M`` rows (the dispatch table, as gemlite's
    ``get_matmul_type``): the first is the default; where two are listed they compute the same
    product and the faster on this shape is kept (``FASTEST``). The bounds are measured on the H100."""
    from glowq_fx.kernels import w4a16 as kernels

    if M >= kernels.DEQUANT_MATMUL_MIN_M:
        return ("dequant_cublas",)  # compute-bound: the dequantization is amortized over the rows
    if M == 1:
        return ("gemv", "gemv_split_k")  # split-K for short outputs with long rows
    if M <= kernels.SMALL_M:
        return ("small_m_gemm", "rows_gemv")
    return ("gemm",)


@dataclass
class _Launch:
    """One launch's arguments: the rows ``x2`` (and ``R2``), the members' kernel slots and outputs."""

    x2: Tensor
    R2: Optional[Tensor]
    ys: list
    slots: list
    Ns: list
    rank: int
    tile_group: int  # the GEMVs' scale slab
    common: dict

    @property
    def head(self) -> tuple:
        x2, R2 = self.x2, self.R2
        has_a = self.common["HAS_A"]
        return (x2, R2 if has_a else x2, x2.stride(0), R2.stride(0) if has_a else 0, x2.shape[0], x2.shape[1],
                self.rank)

    def blocks(self, meta) -> int:
        return sum(_cdiv(n, meta["BLOCK_N"]) for n in self.Ns)


def _launch_gemv(L: _Launch) -> list:
    from glowq_fx.kernels import w4a16 as kernels
    x2 = L.x2
    wrap_triton(kernels.gemv_kernel)[lambda meta: (L.blocks(meta), 1, meta["SPLIT_K"])](
        *L.head, x2, x2, 0, *L.slots, **L.common, TILE_GROUP=L.tile_group)
    return L.ys


def _launch_gemv_split_k(L: _Launch) -> list:
    from glowq_fx.kernels import w4a16 as kernels
    ws, arrivals, ws_stride = split_k_scratch(L.x2, L.Ns)
    wrap_triton(kernels.gemv_split_k_kernel)[lambda meta: (L.blocks(meta), 1, meta["SPLIT_K"])](
        *L.head, ws, arrivals, ws_stride, *L.slots, **L.common, TILE_GROUP=L.tile_group)
    return L.ys


def _launch_gemm(L: _Launch) -> list:
    from glowq_fx.kernels import w4a16 as kernels
    M = L.x2.shape[0]
    kernel = kernels.small_m_kernel if M <= kernels.SMALL_M else kernels.gemm_kernel
    # every kernel argument is passed explicitly: Inductor's analysis of user kernels does not see
    # Python defaults
    upcast = kernels.interpreting() and L.x2.dtype == torch.bfloat16
    wrap_triton(kernel)[lambda meta: (_cdiv(M, meta["BLOCK_M"]), L.blocks(meta))](
        *L.head, *L.slots, **L.common, UPCAST_DOT=upcast)
    return L.ys


def _launch_rows_gemv(L: _Launch) -> list:
    from glowq_fx.kernels import w4a16 as kernels
    M = L.x2.shape[0]
    block_m = min(kernels.ROWS_GEMV_MAX_BLOCK_M, 1 << (M - 1).bit_length())
    wrap_triton(kernels.rows_gemv_kernel)[lambda meta: (L.blocks(meta), _cdiv(M, block_m))](
        *L.head, *L.slots, **L.common, BLOCK_M=block_m, TILE_GROUP=L.tile_group)
    return L.ys


LAUNCHERS = {"gemv": _launch_gemv, "gemv_split_k": _launch_gemv_split_k, "small_m_gemm": _launch_gemm,
             "gemm": _launch_gemm, "rows_gemv": _launch_rows_gemv}


def _forced_form(M: int, split_k: Optional[bool], rows_gemv: Optional[bool]) -> Optional[str]:
    """The form a caller's ``split_k`` / ``rows_gemv`` asks for at ``M`` rows (None: not forced)."""
    forms = w4a16_forms(M)
    if M == 1 and split_k is not None:
        return forms[1] if split_k else forms[0]
    if "rows_gemv" in forms and rows_gemv is not None:
        return "rows_gemv" if rows_gemv else forms[0]
    return None if len(forms) > 1 else forms[0]


def launch_w4a16(x: Tensor, qweights: Sequence[Tensor], scales: Sequence[Tensor], zeros: Sequence[Tensor],
                 biases: Sequence[Optional[Tensor]], As: Sequence[Optional[Tensor]], R: Optional[Tensor],
                 outs: Optional[Sequence[Tensor]] = None, split_k: Optional[bool] = None,
                 rows_gemv: Optional[bool] = None) -> list[Tensor]:
    """Run the Triton kernels for members that read ``x`` (checked by the caller), in the form
    ``w4a16_forms`` names for its rows: one launch per ``MAX_MEMBERS`` members of one kind (bias
    and correction present or not, group size), or from ``DEQUANT_MATMUL_MIN_M`` rows a dequantize
    + cuBLAS per member. Returns each member's output ``x.shape[:-1] + (N_i,)``, written into
    ``outs[i]`` (contiguous, (rows, N_i)) when given. Works on CPU tensors under ``TRITON_INTERPRET=1``.

    ``split_k`` (one row only): True / False force the split-K / plain GEMV; None times both once
    per shape on the GPU and keeps the faster (the plain one under the interpreter). ``rows_gemv``
    (2 to ``SMALL_M`` rows): the same choice between the several-row GEMV and the small-M
    tensor-core GEMM (the GEMM under the interpreter)."""
    from glowq_fx.kernels import w4a16 as kernels

    K = x.shape[-1]
    x2 = _dense_rows(x.reshape(-1, K))
    M = x2.shape[0]
    R2 = None if R is None else _dense_rows(R.reshape(-1, R.shape[-1]))
    # the kernels index the weights as dense row-major: a strided view (a transposed A, a column
    # slice of scales) would be read as the wrong elements, so such a tensor is copied once here
    qweights, scales, zeros, biases, As = ([_dense(t) for t in ts] for ts in (qweights, scales, zeros, biases, As))
    n = len(qweights)
    ys = [x2.new_empty(M, qweights[i].shape[1]) if outs is None else outs[i] for i in range(n)]
    results = [ys[i].view(*x.shape[:-1], qweights[i].shape[1]) for i in range(n)]
    if M == 0:  # nothing to launch (and no shape to time)
        return results
    if w4a16_forms(M) == ("dequant_cublas",):
        for i in range(n):
            _dequantized_matmul(x2, qweights[i], scales[i], zeros[i], biases[i], As[i], R2, ys[i])
        return results
    form = _forced_form(M, split_k, rows_gemv)
    for (has_bias, has_a, gs), members in _kinds(qweights, scales, biases, As).items():
        for c in range(0, len(members), kernels.MAX_MEMBERS):
            chunk = members[c:c + kernels.MAX_MEMBERS]
            chunk_ys = [ys[i] for i in chunk]
            rank = 0 if R2 is None or not has_a else R2.shape[1]
            L = _Launch(x2, R2, chunk_ys, _member_slots(chunk, qweights, scales, zeros, biases, As, chunk_ys, has_a,
                                                        has_bias),
                        [qweights[i].shape[1] for i in chunk], rank, kernels.tile_group(gs, scales[chunk[0]].shape[0]),
                        dict(NUM_MEMBERS=len(chunk), GROUP_SIZE=gs, HAS_A=has_a, HAS_BIAS=has_bias))
            chosen = form
            if chosen is None:  # decided per launch: each has its own shape and agreement check
                forms = w4a16_forms(M)
                tag = "gemv" if M == 1 else "small_m"
                key = (tag, x2.device, x2.dtype, *((M,) if M > 1 else ()), K, tuple(L.Ns), rank, gs, has_a,
                       has_bias)
                chosen = FASTEST.choose(key, {f: functools.partial(LAUNCHERS[f], L) for f in forms},
                                        fallback=forms[0])
            LAUNCHERS[chosen](L)
    return results


def _kinds(qweights, scales, biases, As) -> dict[tuple[bool, bool, int], list[int]]:
    """Members by kind (bias present, correction present, group size): one kernel specialisation each."""
    kinds: dict[tuple[bool, bool, int], list[int]] = {}
    for i in range(len(qweights)):
        kind = (biases[i] is not None, As[i] is not None, group_size_of(qweights[i], scales[i]))
        kinds.setdefault(kind, []).append(i)
    return kinds


def _dense_rows(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _member_slots(chunk: Sequence[int], qweights, scales, zeros, biases, As, ys, has_a: bool, has_bias: bool) -> list:
    """The kernels' per-member arguments (weight, scales, zeros, A, bias, output, N) for the
    members ``chunk``, ``MAX_MEMBERS`` slots (unused slots repeat the last member)."""
    from glowq_fx.kernels import w4a16 as kernels

    slots = []
    for j in range(kernels.MAX_MEMBERS):
        i = chunk[min(j, len(chunk) - 1)]
        y = ys[min(j, len(chunk) - 1)]
        dummy = scales[i]  # a pointer of the activation dtype for absent bias / A
        slots += [qweights[i], scales[i], zeros[i], As[i] if has_a else dummy, biases[i] if has_bias else dummy, y,
                  qweights[i].shape[1]]
    return slots


def launch_w4a16_projected(x: Tensor, qweights: Sequence[Tensor], scales: Sequence[Tensor], zeros: Sequence[Tensor],
                           biases: Sequence[Optional[Tensor]], As: Sequence[Tensor], B: Tensor,
                           outs: Optional[Sequence[Tensor]] = None, one_launch: Optional[bool] = None,
                           own_r: bool = False) -> list[Tensor]:
    """``launch_w4a16`` for a group whose ``R = x B^T`` is not made yet (checked by the caller):
    for one row, where every member has its ``A`` and the members fit one launch, R can be made
    inside the GEMV's launch (``kernels.w4a16.gemv_projected_kernel``: no launch of its own that
    the GEMV waits for); otherwise, and wherever that is not faster, R's own launch
    (``launch_projection``) and then ``launch_w4a16``.

    ``one_launch``: True / False force a form; None times both once per shape on the GPU and keeps
    the faster that agrees (R's own launch under the interpreter). ``own_r``: in the one launch,
    every column block makes its own R instead of waiting for the producers' (the path a waiting
    program falls back to; for tests)."""
    from glowq_fx.kernels import w4a16 as kernels

    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, n = x2.shape[0], len(qweights)
    qweights, scales, zeros, biases, As = ([_dense(t) for t in ts] for ts in (qweights, scales, zeros, biases, As))
    B = _dense(B)
    group_sizes = {group_size_of(q, s) for q, s in zip(qweights, scales)}
    fits = (M == 1 and n <= kernels.MAX_MEMBERS and len(group_sizes) == 1 and all(A is not None for A in As)
            and len({b is None for b in biases}) == 1)
    ys = [x2.new_empty(M, q.shape[1]) if outs is None else outs[i] for i, q in enumerate(qweights)]

    def separate():
        return launch_w4a16(x2, qweights, scales, zeros, biases, As, launch_projection(x2, B), outs=ys)

    def one():
        sync = torch.zeros(3 * M, dtype=torch.int32, device=x2.device)  # per launch: never shared
        gemv_projected(x2, qweights, scales, zeros, biases, As, B, ys, sync, own_r)
        return ys

    use_one = fits and one_launch is not False
    if fits and one_launch is None:
        key = ("gemv_projected", x2.device, x2.dtype, K, tuple(q.shape[1] for q in qweights), B.shape[0],
               next(iter(group_sizes)), biases[0] is not None)
        use_one = FASTEST.choose(key, {"separate": separate, "one_launch": one}, fallback="separate") == "one_launch"
    if one_launch and not fits:
        raise ValueError("the one-launch form takes one row and up to MAX_MEMBERS members, all with A, of one group "
                         "size and one bias kind")
    (one if use_one else separate)()
    return [y.view(*x.shape[:-1], y.shape[1]) for y in ys]


def gemv_projected(x2: Tensor, qweights, scales, zeros, biases, As, B: Tensor, ys: Sequence[Tensor], sync: Tensor,
                   own_r: bool = False) -> None:
    """One launch of ``kernels.w4a16.gemv_projected_kernel`` for rows ``x2`` (dense) into ``ys``;
    ``sync``: int32 (3 * rows,) counters, zero (the kernel leaves them zero again)."""
    from glowq_fx.kernels import w4a16 as kernels

    M, K = x2.shape
    n, rank, has_bias = len(qweights), B.shape[0], biases[0] is not None
    gs = group_size_of(qweights[0], scales[0])
    producers = 0 if own_r else _cdiv(rank, kernels.PRODUCER_R)
    slots = _member_slots(range(n), qweights, scales, zeros, biases, As, ys, True, has_bias)
    Ns = [q.shape[1] for q in qweights]
    grid = lambda meta: (producers + sum(_cdiv(N, meta["BLOCK_N"]) for N in Ns), M)
    wrap_triton(kernels.gemv_projected_kernel)[grid](
        x2, B, x2.new_empty(M, rank), sync, x2.stride(0), B.stride(0), M, K, rank, *slots, NUM_MEMBERS=n,
        GROUP_SIZE=gs, HAS_BIAS=has_bias, TILE_GROUP=kernels.tile_group(gs, scales[0].shape[0]), PRODUCERS=producers,
        PRODUCER_R=kernels.PRODUCER_R, BLOCK_KP=kernels.PRODUCER_BLOCK_K, SPIN_LIMIT=kernels.SPIN_LIMIT)


def launch_w4a16_experts(x: Tensor, offsets: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
                         bias: Optional[Tensor], A: Optional[Tensor], R: Optional[Tensor],
                         out: Optional[Tensor] = None, block_m: Optional[int] = None,
                         slots: Optional[Tensor] = None) -> Tensor:
    """The grouped experts kernel (``kernels.w4a16_experts``) on rows sorted by expert (checked by
    the caller): one launch for every expert, the output zero-filled first (rows past the last
    offset stay zero). ``block_m`` forces the rows per tile (default ``experts_block_m``);
    ``slots`` (E,) each expert's row of ``A`` (-1: no correction). Works on CPU tensors under
    ``TRITON_INTERPRET=1``."""
    from glowq_fx.kernels import w4a16 as dense
    from glowq_fx.kernels import w4a16_experts as kernels

    M, K = x.shape
    E, N = qweight.shape[0], qweight.shape[-1]
    y = x.new_zeros(M, N) if out is None else out.zero_()
    if M == 0:
        return y
    x, R = _dense(x), _dense(R)
    qweight, scales, zeros, bias, A = (_dense(t) for t in (qweight, scales, zeros, bias, A))
    block_m = block_m or kernels.experts_block_m(M, E)
    tile_ends = _expert_tile_ends(offsets, block_m)
    has_a = A is not None
    has_slots = has_a and slots is not None
    dummy = scales  # a pointer for absent bias / A / slots
    wrap_triton(kernels.experts_kernel)[lambda meta: (_cdiv(M, block_m) + E, _cdiv(N, meta["BLOCK_N"]))](
        x, R if has_a else x, offsets.to(torch.int32), tile_ends, x.stride(0), R.stride(0) if has_a else 0, K, N,
        R.shape[1] if has_a else 0, E, qweight, scales, zeros, A if has_a else dummy,
        slots.to(torch.int32) if has_slots else tile_ends, bias if bias is not None else dummy, y,
        qweight.stride(0), scales.stride(0), A.stride(0) if has_a else 0,
        GROUP_SIZE=group_size_of(qweight[0], scales[0]), HAS_A=has_a, HAS_SLOTS=has_slots, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, UPCAST_DOT=dense.interpreting() and x.dtype == torch.bfloat16)
    return y


def launch_experts_projection(x: Tensor, offsets: Tensor, B: Tensor, out: Optional[Tensor] = None,
                              block_m: Optional[int] = None, slots: Optional[Tensor] = None) -> Tensor:
    """``R`` of rows sorted by expert, each expert's rows times its own ``B_e^T`` (``B`` (E, r, K),
    checked by the caller; with ``slots`` (E,) expert ``e``'s is ``B[slots[e]]``, none where -1), in
    one launch of ``kernels.w4a16_experts.projection_kernel``; rows past the last offset, and those
    of an expert without ``B``, are zero. Works on CPU tensors under ``TRITON_INTERPRET=1``."""
    from glowq_fx.kernels import w4a16 as dense
    from glowq_fx.kernels import w4a16_experts as kernels

    M, K = x.shape
    E, rank = offsets.shape[0], B.shape[1]
    R = x.new_zeros(M, rank) if out is None else out.zero_()
    if M == 0 or rank == 0:
        return R
    x, B = _dense(x), _dense(B)
    block_m = block_m or kernels.experts_block_m(M, E)
    tile_ends = _expert_tile_ends(offsets, block_m)
    wrap_triton(kernels.projection_kernel)[lambda meta: (_cdiv(M, block_m) + E, _cdiv(rank, meta["BLOCK_R"]))](
        x, B, offsets.to(torch.int32), tile_ends, slots.to(torch.int32) if slots is not None else tile_ends, R,
        x.stride(0), R.stride(0), K, rank, E, B.stride(0), HAS_SLOTS=slots is not None, BLOCK_M=block_m,
        UPCAST_DOT=dense.interpreting() and x.dtype == torch.bfloat16)
    return R


def _expert_tile_ends(offsets: Tensor, block_m: int) -> Tensor:
    """int32 (E,): the row tiles of experts ``0..e`` (each expert's rows in tiles of ``block_m``),
    computed on the device: no count is read back to the host."""
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    return torch.cumsum(torch.div(counts + block_m - 1, block_m, rounding_mode="floor"), 0).to(torch.int32)


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


def split_k_scratch(x2: Tensor, Ns: Sequence[int]) -> tuple[Tensor, Tensor, int]:
    """Fresh (float32 partials, zeroed arrival counters, partial row stride) for one split-K
    launch: per launch, not cached, so concurrent launches never share counters."""
    from glowq_fx.kernels import w4a16 as kernels

    ws_stride, counters, most = kernels.split_k_buffers(tuple(Ns))
    M = x2.shape[0]
    ws = x2.new_empty(most * M * ws_stride, dtype=torch.float32)
    return ws, torch.zeros(M * counters, dtype=torch.int32, device=x2.device), ws_stride


def launch_projection(x: Tensor, B: Tensor, kernel: Optional[bool] = None, out: Optional[Tensor] = None) -> Tensor:
    """``R = x B^T`` on the GPU (or under ``TRITON_INTERPRET=1``): up to
    ``kernels.projection.MAX_ROWS`` rows the Triton GEMV or cuBLAS, whichever ran faster on this
    shape (``kernel`` True / False forces one), beyond that cuBLAS. Written into ``out``
    (contiguous, (rows, rank)) when given."""
    from glowq_fx.kernels import projection

    K, rank = x.shape[-1], B.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if B.stride(-1) != 1:
        B = B.contiguous()
    M = x2.shape[0]
    R = x2.new_empty(M, rank) if out is None else out
    if M == 0:
        return R.view(*x.shape[:-1], rank)

    def triton_gemv():
        grid = lambda meta: (_cdiv(rank, meta["BLOCK_R"]), M)
        wrap_triton(projection.projection_gemv_kernel)[grid](x2, B, R, K, rank, x2.stride(0), B.stride(0),
                                                              R.stride(0))
        return R

    def cublas():
        return torch.mm(x2, B.t(), out=R)

    if M > projection.MAX_ROWS:
        kernel = False
    elif kernel is None:
        key = ("projection", x2.device, x2.dtype, M, K, rank)
        kernel = FASTEST.choose(key, {"triton": triton_gemv, "cublas": cublas}, fallback="cublas") == "triton"
    (triton_gemv if kernel else cublas)()
    return R.view(*x.shape[:-1], rank)


def _dequantized_matmul(x2: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                        A: Optional[Tensor], R2: Optional[Tensor], y: Tensor) -> None:
    """Prefill: ``W_q^T`` (K, N) into a buffer by one Triton kernel, then cuBLAS; the correction
    is one more thin GEMM accumulated into ``y``. From ``DEQUANT_MATMUL_MIN_M`` rows this beat
    our fused dequant-GEMM on the H100 (which dequantizes in registers and reached a third of
    cuBLAS): the dequantization (a read of 0.5 and a write of 2 bytes per weight) is amortized."""
    from glowq_fx.kernels import w4a16 as kernels

    K, N = x2.shape[1], qweight.shape[1]
    Wt = x2.new_empty(K, N)
    wrap_triton(kernels.dequantize_kernel)[(_cdiv(K, 64), _cdiv(N, 128))](
        qweight, scales, zeros, Wt, N, K, GROUP_SIZE=group_size_of(qweight, scales), BLOCK_N=128, BLOCK_K=64)
    if bias is None:
        torch.mm(x2, Wt, out=y)
    else:
        torch.addmm(bias, x2, Wt, out=y)
    if A is not None:
        y.addmm_(R2, A.t())


def _cdiv(a, b):
    return (a + b - 1) // b
