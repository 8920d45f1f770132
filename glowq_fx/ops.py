"""The torch.library ops a quantized model runs, visible to Dynamo, AOTAutograd and Inductor.

- ``glowq::shared_projection(x, B) -> R``: ``R = x B^T``, one group's right factor.
- ``glowq::w4a16_linear(x, qweight, scales, zeros, bias, A, R) -> y``:
  ``y = x deq(qweight)^T + R A^T (+ bias)``; ``A`` and ``R`` are both given or both None.
- ``glowq::w4a16_group(x, qweights, scales, zeros, biases, As, R) -> [y_i]``: every member of a
  group that reads ``x`` in one launch (``glowq_backend`` inserts it; eager modules never do).

They are ``custom_op``s tagged ``flexible_layout`` (Inductor passes the shared input as it is,
without a copy per consumer): Inductor calls them as opaque kernels from its generated code,
and CUDA graphs (``mode="reduce-overhead"``) capture the Triton launches inside. They were
``triton_op``s, which let Inductor trace into the launches, but on the H100 (torch 2.11,
triton 3.6) the Inductor-lowered launch of these multi-pointer kernels crashed the process,
while the same launches called from the op body are verified (kernel tests, benchmark): the
opaque form stays until that is debugged on a GPU. Each body branches on the device: CUDA
half/bfloat16 inputs run the Triton kernels of ``glowq_fx.kernels.w4a16``; everything else
(CPU, float32) runs the pure-torch reference, the same arithmetic as the eager module always
had (dequantize to the activation dtype, then ``F.linear``), which is what a compiled CPU graph
lowers to. Every entry checks shapes and dtypes and raises a ``ValueError`` naming the problem:
a wrong ``R`` or ``A`` is an error, never a silently uncorrected output.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op, wrap_triton

from glowq_fx.kernels.layout import dequantize_packed

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def group_size_of(qweight: Tensor, scales: Tensor) -> int:
    """The quantization group size implied by the packed shapes: ``K_pad / n_groups``."""
    return qweight.shape[0] * 8 // scales.shape[0]


def _check_member(i: int, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                  A: Optional[Tensor], R: Optional[Tensor]) -> None:
    who = f"member {i}: " if i >= 0 else ""
    K = x.shape[-1]
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias), ("A", A), ("R", R)):
        _check_device(who, name, t, x)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"{who}qweight must be int32 (K_pad/8, N), got {qweight.dtype} of shape {tuple(qweight.shape)}")
    N, k_pad = qweight.shape[1], qweight.shape[0] * 8
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dim() != 2 or t.shape[1] != N or (k_pad % t.shape[0]) != 0:
            raise ValueError(f"{who}{name} must be (n_groups, {N}) with n_groups dividing K_pad={k_pad}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{who}{name} are {t.dtype} but x is {x.dtype}: run the model in the dtype it was "
                             "quantized in (cast the inputs, or the model with .to(dtype))")
    gs = group_size_of(qweight, scales)
    if gs % 8 or -(-K // gs) * gs != k_pad:
        raise ValueError(f"{who}x has {K} features but the packed weight holds K_pad={k_pad} columns in groups of "
                         f"{gs}: the input does not belong to this weight")
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"{who}bias must be ({N},) {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if (A is None) != (R is None):
        raise ValueError(f"{who}A and R go together: got A={'None' if A is None else 'a tensor'}, "
                         f"R={'None' if R is None else 'a tensor'} (a correction needs both)")
    if A is not None:
        if A.dim() != 2 or A.shape[0] != N or A.shape[1] != R.shape[-1] or A.dtype != x.dtype:
            raise ValueError(f"{who}A must be ({N}, rank={R.shape[-1]}) {x.dtype} to match R, got "
                             f"{tuple(A.shape)} {A.dtype}")
        if R.shape[:-1] != x.shape[:-1] or R.dtype != x.dtype:
            raise ValueError(f"{who}R must be {tuple(x.shape[:-1])} + (rank,) {x.dtype} like x, got "
                             f"{tuple(R.shape)} {R.dtype}: R is the projection of this very x")


def _check_device(who: str, name: str, t: Optional[Tensor], x: Tensor) -> None:
    if t is not None and t.device != x.device:
        raise ValueError(f"{who}{name} is on {t.device} but x is on {x.device}: move the model and its inputs to "
                         "one device (model.to(device))")


def _check_projection(x: Tensor, B: Tensor) -> None:
    _check_device("", "B", B, x)
    if B.dim() != 2 or B.shape[1] != x.shape[-1] or B.dtype != x.dtype:
        raise ValueError(f"B must be (rank, {x.shape[-1]}) {x.dtype} to project x, got {tuple(B.shape)} {B.dtype}")


def reference_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                     A: Optional[Tensor], R: Optional[Tensor]) -> Tensor:
    """Pure-torch ``x W_q^T + bias + R A^T``: the eager module's arithmetic, term by term."""
    W = dequantize_packed(qweight, scales, zeros, group_size_of(qweight, scales), x.shape[-1], x.dtype)
    y = F.linear(x, W, bias)
    return y if A is None else y + F.linear(R, A)


def _uses_kernels(x: Tensor) -> bool:
    return x.device.type == "cuda" and x.dtype in KERNEL_DTYPES


def launch_w4a16(x: Tensor, qweights: Sequence[Tensor], scales: Sequence[Tensor], zeros: Sequence[Tensor],
                 biases: Sequence[Optional[Tensor]], As: Sequence[Optional[Tensor]], R: Optional[Tensor],
                 outs: Optional[Sequence[Tensor]] = None, split_k: Optional[bool] = None,
                 rows_gemv: Optional[bool] = None) -> list[Tensor]:
    """Run the Triton kernels for members that read ``x`` (checked by the caller): below
    ``DEQUANT_MATMUL_MIN_M`` rows one launch per ``MAX_MEMBERS`` members of equal
    bias/correction presence, from there a dequantize + cuBLAS per member. Returns each member's output
    ``x.shape[:-1] + (N_i,)``, written into ``outs[i]`` (contiguous, (rows, N_i)) when given.
    Works on CPU tensors under ``TRITON_INTERPRET=1``.

    ``split_k`` (one row only): True / False force the split-K / plain GEMV; None times both once
    per shape on the GPU and keeps the faster (the plain one under the interpreter). ``rows_gemv``
    (2 to ``SMALL_M`` rows): the same choice between the several-row GEMV and the small-M
    tensor-core GEMM (the GEMM under the interpreter)."""
    from glowq_fx.kernels import w4a16 as kernels

    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    R2 = None if R is None else R.reshape(-1, R.shape[-1])
    if R2 is not None and R2.stride(-1) != 1:
        R2 = R2.contiguous()
    # the kernels index the weights as dense row-major: a strided view (a transposed A, a column
    # slice of scales) would be read as the wrong elements, so such a tensor is copied once here
    qweights, scales, zeros, biases, As = ([_dense(t) for t in ts] for ts in (qweights, scales, zeros, biases, As))
    results: list[Optional[Tensor]] = [None] * len(qweights)
    shape = lambda i: (*x.shape[:-1], qweights[i].shape[1])
    if M == 0:  # nothing to launch (and no shape to time)
        return [(x2.new_empty(0, q.shape[1]) if outs is None else outs[i]).view(shape(i)) for i, q in enumerate(qweights)]
    if M >= kernels.DEQUANT_MATMUL_MIN_M:  # one dequantize + cuBLAS per member, no fused launch
        for i in range(len(qweights)):
            y = x2.new_empty(M, qweights[i].shape[1]) if outs is None else outs[i]
            _dequantized_matmul(x2, qweights[i], scales[i], zeros[i], biases[i], As[i], R2, y)
            results[i] = y.view(shape(i))
        return results  # type: ignore[return-value]
    kinds: dict[tuple[bool, bool], list[int]] = {}
    for i in range(len(qweights)):
        kinds.setdefault((biases[i] is not None, As[i] is not None), []).append(i)
    for (has_bias, has_a), idx in kinds.items():
        for c in range(0, len(idx), kernels.MAX_MEMBERS):
            chunk = idx[c:c + kernels.MAX_MEMBERS]
            ys = [x2.new_empty(M, qweights[i].shape[1]) if outs is None else outs[i] for i in chunk]
            slots = []
            for j in range(kernels.MAX_MEMBERS):
                i = chunk[min(j, len(chunk) - 1)]  # unused slots repeat the last member
                y = ys[min(j, len(chunk) - 1)]
                dummy = scales[i]  # a pointer of the activation dtype for absent bias / A
                slots += [qweights[i], scales[i], zeros[i], As[i] if has_a else dummy,
                          biases[i] if has_bias else dummy, y, qweights[i].shape[1]]
            rank = 0 if R2 is None or not has_a else R2.shape[1]
            gs = group_size_of(qweights[chunk[0]], scales[chunk[0]])
            common = dict(NUM_MEMBERS=len(chunk), GROUP_SIZE=gs, HAS_A=has_a, HAS_BIAS=has_bias)
            # every kernel argument is passed explicitly: Inductor's analysis of user kernels does
            # not see Python defaults
            tile_group = kernels.tile_group(gs, scales[chunk[0]].shape[0])  # the GEMVs' scale slab
            gemm_only = dict(UPCAST_DOT=kernels.interpreting() and x.dtype == torch.bfloat16)
            Ns = [qweights[i].shape[1] for i in chunk]
            blocks = lambda meta: sum(_cdiv(n, meta["BLOCK_N"]) for n in Ns)
            head = (x2, R2 if has_a else x2, x2.stride(0), R2.stride(0) if has_a else 0, M, K, rank)
            if M == 1:
                grid = lambda meta: (blocks(meta), M, meta["SPLIT_K"])

                def plain():
                    wrap_triton(kernels.gemv_kernel)[grid](*head, x2, x2, 0, *slots, **common, TILE_GROUP=tile_group)
                    return ys

                def split():
                    ws, arrivals, ws_stride = _split_k_scratch(x2, Ns)
                    wrap_triton(kernels.gemv_split_k_kernel)[grid](*head, ws, arrivals, ws_stride, *slots, **common,
                                                                   TILE_GROUP=tile_group)
                    return ys

                use_split = split_k  # decided per launch: each has its own shape and agreement check
                if use_split is None:
                    key = ("gemv", x2.device, x2.dtype, K, tuple(Ns), rank, gs, has_a, has_bias)
                    use_split = _fastest(key, {"split": split, "plain": plain}, fallback="plain") == "split"
                (split if use_split else plain)()
            else:
                kernel = kernels.small_m_kernel if M <= kernels.SMALL_M else kernels.gemm_kernel

                def gemm():
                    wrap_triton(kernel)[lambda meta: (_cdiv(M, meta["BLOCK_M"]), blocks(meta))](
                        *head, *slots, **common, **gemm_only)
                    return ys

                def rows():
                    block_m = min(kernels.ROWS_GEMV_MAX_BLOCK_M, 1 << (M - 1).bit_length())
                    wrap_triton(kernels.rows_gemv_kernel)[lambda meta: (blocks(meta), _cdiv(M, block_m))](
                        *head, *slots, **common, BLOCK_M=block_m, TILE_GROUP=tile_group)
                    return ys

                use_rows = False if M > kernels.SMALL_M else rows_gemv  # decided per launch, as above
                if use_rows is None:
                    key = ("small_m", x2.device, x2.dtype, M, K, tuple(Ns), rank, gs, has_a, has_bias)
                    use_rows = _fastest(key, {"rows": rows, "gemm": gemm}, fallback="gemm") == "rows"
                (rows if use_rows else gemm)()
            for i, y in zip(chunk, ys):
                results[i] = y.view(shape(i))
    return results  # type: ignore[return-value]


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _split_k_scratch(x2: Tensor, Ns: Sequence[int]) -> tuple[Tensor, Tensor, int]:
    """Fresh (float32 partials, zeroed arrival counters, partial row stride) for one split-K
    launch: per launch, not cached, so concurrent launches never share counters."""
    from glowq_fx.kernels import w4a16 as kernels

    ws_stride, counters, most = kernels.split_k_buffers(tuple(Ns))
    M = x2.shape[0]
    ws = x2.new_empty(most * M * ws_stride, dtype=torch.float32)
    return ws, torch.zeros(M * counters, dtype=torch.int32, device=x2.device), ws_stride


# (what, device, dtype, shape...) -> the name of the implementation that was fastest there
_FASTEST: dict[tuple, str] = {}


def _fastest(key: tuple, candidates: dict[str, Callable[[], Sequence[Tensor]]], fallback: str) -> str:
    """The candidate that ran fastest on this shape, timed once as CUDA-graph replays (as a served
    model runs them; each autotunes in its warm-up calls) and remembered. Only candidates whose
    outputs agree with ``fallback``'s on this very call compete (``_agreeing``). The interpreter
    cannot time, nor can a first call made during someone's graph capture: ``fallback``, decided
    later. Each candidate returns its outputs."""
    from glowq_fx.kernels import w4a16 as kernels
    from glowq_fx.timing import graph_time_ms

    if kernels.interpreting():
        return fallback
    if key not in _FASTEST:
        if torch.cuda.is_current_stream_capturing():
            return fallback
        times = {}
        for name in _agreeing(key, candidates, fallback):
            try:
                times[name] = graph_time_ms(candidates[name], 20)
            except Exception as exc:  # noqa: BLE001 - e.g. a launch that cannot be graph-captured
                if name == fallback:
                    raise
                _leave_out(name, key, fallback, f"failed while being timed ({type(exc).__name__}: {exc})")
        _FASTEST[key] = min(times, key=times.get)
    return _FASTEST[key]


AGREE_ULPS = 8  # of the output dtype's eps, times |ref| + rms(ref): see _agreeing


def _agreeing(key: tuple, candidates: dict[str, Callable[[], Sequence[Tensor]]], fallback: str) -> list[str]:
    """``fallback`` and the candidates whose outputs match its outputs on the same inputs, each
    output element within ``AGREE_ULPS`` units of its dtype's precision of ``|ref| + rms(ref)``.
    The paths differ only in float32 summation order and so agree far closer than that, while a
    dropped K slice or a racing reduction misses by a large fraction of the output. A candidate
    that disagrees, or raises (a kernel that does not compile for this GPU), is left out with a
    ``GlowQWarning``: the fallback path is the one verified on the GPU, and a wrong or broken fast
    kernel must never be chosen silently. Errors of the fallback itself propagate."""
    outputs = _as_outputs(candidates[fallback]())
    reference = [t.clone() for t in outputs]
    kept = [fallback]
    for name, fn in candidates.items():
        if name == fallback:
            continue
        for t in outputs:  # the candidates write into the same buffers: one that writes nothing must not pass
            t.fill_(float("nan"))
        try:
            worst = max(_excess(out, ref) for out, ref in zip(_as_outputs(fn()), reference))
        except Exception as exc:  # noqa: BLE001 - Triton's compile and resource errors share no base class
            _leave_out(name, key, fallback, f"raised {type(exc).__name__}: {exc}")
            continue
        if worst <= 1:
            kept.append(name)
        else:
            _leave_out(name, key, fallback, f"disagrees with the '{fallback}' path (its worst element is off by "
                                            f"{worst:.3g}x the tolerance)")
    return kept  # the buffers hold the last candidate's outputs: callers run the chosen path after this


def _leave_out(name: str, key: tuple, fallback: str, why: str) -> None:
    from glowq_fx.capture import GlowQWarning

    warnings.warn(f"glowq: the '{name}' path for {key} {why}; it is not used, '{fallback}' is. Please report "
                  "this with the GPU name and the torch and triton versions.", GlowQWarning, stacklevel=3)


def _as_outputs(outputs: Tensor | Sequence[Tensor]) -> Sequence[Tensor]:
    return [outputs] if isinstance(outputs, Tensor) else outputs


def _excess(out: Tensor, ref: Tensor) -> float:
    """Largest ``|out - ref| / tolerance`` over the elements (<= 1: they agree); NaN where
    ``ref`` is finite counts as infinitely far."""
    ref32, out32 = ref.float(), out.float()
    finite = torch.isfinite(ref32)
    scale = ref32[finite].pow(2).mean().sqrt() if finite.any() else ref32.new_zeros(())
    tol = AGREE_ULPS * torch.finfo(ref.dtype).eps * (ref32.abs() + scale) + torch.finfo(torch.float32).tiny
    excess = ((out32 - ref32).abs() / tol).nan_to_num(nan=float("inf"))
    same = (out32 == ref32) | (out32.isnan() & ref32.isnan())  # equal infinities and NaNs agree too
    excess = torch.where(same, torch.zeros_like(excess), excess)
    return float(excess.max()) if excess.numel() else 0.0


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
        kernel = _fastest(key, {"triton": triton_gemv, "cublas": cublas}, fallback="cublas") == "triton"
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


@custom_op("glowq::shared_projection", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def shared_projection(x: Tensor, B: Tensor) -> Tensor:
    """``R = x B^T``: on CUDA half / bfloat16 ``launch_projection`` (a Triton GEMV for decode rows
    when it beats cuBLAS), elsewhere ``F.linear``."""
    _check_projection(x, B)
    if _uses_kernels(x):
        return launch_projection(x, B)
    return F.linear(x, B)


@custom_op("glowq::w4a16_linear", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def w4a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                 A: Optional[Tensor], R: Optional[Tensor]) -> Tensor:
    """One 4-bit linear with its low-rank epilogue (see the module docstring)."""
    _check_member(-1, x, qweight, scales, zeros, bias, A, R)
    if _uses_kernels(x):
        return launch_w4a16(x, [qweight], [scales], [zeros], [bias], [A], R)[0]
    return reference_linear(x, qweight, scales, zeros, bias, A, R)


@custom_op("glowq::w4a16_group", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def w4a16_group(x: Tensor, qweights: list[Tensor], scales: list[Tensor], zeros: list[Tensor],
                biases: list[Optional[Tensor]], As: list[Optional[Tensor]], R: Optional[Tensor]) -> list[Tensor]:
    """All members of a group that read ``x``, horizontally fused; ``R`` is shared by the members
    with a correction (``As[i]`` given) and ignored by none: a member without ``A`` next to an
    ``R`` is an error, as is ``R`` missing for a member with ``A``."""
    n = len(qweights)
    if n == 0 or not (len(scales) == len(zeros) == len(biases) == len(As) == n):
        raise ValueError(f"w4a16_group needs one qweight/scales/zeros/bias/A per member, got lengths "
                         f"{[len(qweights), len(scales), len(zeros), len(biases), len(As)]}")
    for i in range(n):
        _check_member(i, x, qweights[i], scales[i], zeros[i], biases[i], As[i], R)
    if _uses_kernels(x):
        return launch_w4a16(x, qweights, scales, zeros, biases, As, R)
    return [reference_linear(x, qweights[i], scales[i], zeros[i], biases[i], As[i], R) for i in range(n)]


@shared_projection.register_fake
def _(x, B):
    _check_projection(x, B)
    return x.new_empty(*x.shape[:-1], B.shape[0])


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, bias, A, R):
    _check_member(-1, x, qweight, scales, zeros, bias, A, R)
    return x.new_empty(*x.shape[:-1], qweight.shape[1])


@w4a16_group.register_fake
def _(x, qweights, scales, zeros, biases, As, R):
    for i in range(len(qweights)):
        _check_member(i, x, qweights[i], scales[i], zeros[i], biases[i], As[i], R)
    return [x.new_empty(*x.shape[:-1], q.shape[1]) for q in qweights]
