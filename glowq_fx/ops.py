"""The torch.library ops a quantized model runs, visible to Dynamo, AOTAutograd and Inductor.

- ``glowq::shared_projection(x, B) -> R``: ``R = x B^T``, one group's right factor.
- ``glowq::w4a16_linear(x, qweight, scales, zeros, bias, A, R) -> y``:
  ``y = x deq(qweight)^T + R A^T (+ bias)``; ``A`` and ``R`` are both given or both None.
- ``glowq::w4a16_group(x, qweights, scales, zeros, biases, As, R) -> [y_i]``: every member of a
  group that reads ``x`` in one launch (``glowq_backend`` inserts it; eager modules never do).
- ``glowq::w4a16_group_projected(x, qweights, scales, zeros, biases, As, B) -> [y_i]``: the same
  with the group's ``R = x B^T`` made by the op (for one row on CUDA, inside the GEMV's launch
  where that is faster; ``glowq_backend`` inserts it for a projection that one group node reads).
- ``glowq::w4a16_linear_int4pack(x, qweight, scales, zeros, bias, A, R, int4pack, scales_zeros) -> y``:
  ``w4a16_linear`` on the CPU with the codes also in the layout of PyTorch's CPU int4 kernel
  (``glowq_fx.kernels.cpu_int4``): that kernel for decode rows, dequantize + GEMM for prefill.
- ``glowq::w4a16_experts(x, offsets, qweight, scales, zeros, bias, A, R, slots) -> y`` and
  ``glowq::experts_projection(x, offsets, B, slots) -> R``: an MoE block's experts on rows sorted
  by expert (``offsets``: each expert's end row), the 3-D weights stacked (E, ...); ``slots``
  (E,), when given, says which of the stacked ``A`` / ``B`` rows is each expert's (-1: none; GlowQ-S
  dropped that expert's correction and stores only the others').

They are ``custom_op``s tagged ``flexible_layout`` (Inductor passes the shared input as it is,
without a copy per consumer): Inductor calls them as opaque kernels from its generated code,
and CUDA graphs (``mode="reduce-overhead"``) capture the Triton launches inside. They were
``triton_op``s, which let Inductor trace into the launches, but on the H100 (torch 2.11,
triton 3.6) the Inductor-lowered launch of these multi-pointer kernels crashed the process,
while the same launches called from the op body are verified (kernel tests, benchmark): the
opaque form stays until that is debugged on a GPU. Each body branches on the device: CUDA
half/bfloat16 inputs run the Triton kernels (launched by ``glowq_fx.kernels.launch``); everything else
(CPU, float32) runs the pure-torch reference, the same arithmetic as the eager module always
had (dequantize to the activation dtype, then ``F.linear``), which is what a compiled CPU graph
lowers to. The factors ``A`` and ``B`` may be stored in a narrower float dtype than the
activations (``GlowQConfig.factor_dtype``: bfloat16 factors in a float32 model) and are widened
where they are used. Every entry checks shapes and dtypes and raises a ``ValueError`` naming the problem:
a wrong ``R`` or ``A`` is an error, never a silently uncorrected output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

from glowq_fx.kernels import cpu_gemv, cpu_int4
from glowq_fx.kernels.launch import (
    launch_experts_projection,
    launch_projection,
    launch_w4a16,
    launch_w4a16_experts,
    launch_w4a16_projected,
)
from glowq_fx.kernels.layout import (
    dequantize_packed,
    group_size_of,
    packed_columns,
    padded_in_features,
    whole_group_columns,
)

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _check_member(i: int, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                  A: Optional[Tensor], R: Optional[Tensor]) -> None:
    who = f"member {i}: " if i >= 0 else ""
    K = x.shape[-1]
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias), ("A", A), ("R", R)):
        _check_device(who, name, t, x)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(
            f"{who}qweight must be int32 (K_pad/8, N), got {qweight.dtype} of shape {tuple(qweight.shape)}"
        )
    N, k_pad = qweight.shape[1], padded_in_features(qweight)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dim() != 2 or t.shape[1] != N or not 0 < t.shape[0] <= k_pad // 8 or t.shape != scales.shape:
            raise ValueError(f"{who}{name} must be (n_groups, {N}) with n_groups groups of the K_pad={k_pad} columns, "
                             f"got {tuple(t.shape)}")
        if t.dtype != x.dtype and not (name == "zeros" and t.dtype == torch.uint8):  # uint8: 16 * zero
            raise ValueError(f"{who}{name} are {t.dtype} but x is {x.dtype}: run the model in the dtype it was "
                             "quantized in (cast the inputs, or the model with .to(dtype))")
    gs = group_size_of(qweight, scales)  # a ValueError for shapes no layout has
    if gs % 8 or k_pad not in (-(-K // gs) * gs, packed_columns(K, gs)):  # whole groups, or a partial last one
        raise ValueError(f"{who}x has {K} features but the packed weight holds K_pad={k_pad} columns in groups of "
                         f"{gs}: the input does not belong to this weight")
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"{who}bias must be ({N},) {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if (A is None) != (R is None):
        raise ValueError(f"{who}A and R go together: got A={'None' if A is None else 'a tensor'}, "
                         f"R={'None' if R is None else 'a tensor'} (a correction needs both)")
    if A is not None:
        if A.dim() != 2 or A.shape[0] != N or A.shape[1] != R.shape[-1] or not A.is_floating_point():
            raise ValueError(f"{who}A must be ({N}, rank={R.shape[-1]}) floating point to match R, got "
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
    if B.dim() != 2 or B.shape[1] != x.shape[-1] or not B.is_floating_point():
        raise ValueError(f"B must be (rank, {x.shape[-1]}) floating point to project x, got {tuple(B.shape)} {B.dtype}")


def widen_factor(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A factor in ``x``'s dtype: factors may be stored narrower than the activations
    (``GlowQConfig.factor_dtype``) and are widened here, where they are used."""
    return t if t is None or t.dtype == x.dtype else t.to(x.dtype)


def reference_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                     A: Optional[Tensor], R: Optional[Tensor]) -> Tensor:
    """Pure-torch ``x W_q^T + bias + R A^T``: the eager module's arithmetic, term by term."""
    W = dequantize_packed(qweight, scales, zeros, group_size_of(qweight, scales), x.shape[-1], x.dtype)
    y = F.linear(x, W, bias)
    return y if A is None else y + F.linear(R, widen_factor(A, R))


def _uses_kernels(x: Tensor) -> bool:
    return x.device.type == "cuda" and x.dtype in KERNEL_DTYPES


@custom_op("glowq::shared_projection", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def shared_projection(x: Tensor, B: Tensor) -> Tensor:
    """``R = x B^T``: on CUDA half / bfloat16 ``launch_projection`` (a Triton GEMV for decode rows
    when it beats cuBLAS), elsewhere ``F.linear``."""
    _check_projection(x, B)
    if _uses_kernels(x):
        return launch_projection(x, widen_factor(B, x))
    return projection_product(x, B)


def projection_product(x: Tensor, B: Tensor) -> Tensor:
    """``x B^T`` off the GPU kernels: our CPU GEMV for decode rows (it reads ``B`` as stored),
    else ``F.linear`` in ``x``'s dtype."""
    if cpu_gemv.serves(x):
        return cpu_gemv.project(x, B)
    return F.linear(x, widen_factor(B, x))


@custom_op("glowq::w4a16_linear", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def w4a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                 A: Optional[Tensor], R: Optional[Tensor]) -> Tensor:
    """One 4-bit linear with its low-rank epilogue (see the module docstring)."""
    _check_member(-1, x, qweight, scales, zeros, bias, A, R)
    if _uses_kernels(x):
        return launch_w4a16(x, [qweight], [scales], [zeros], [bias], [widen_factor(A, x)], R)[0]
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
        return launch_w4a16(x, qweights, scales, zeros, biases, [widen_factor(A, x) for A in As], R)
    return reference_group(x, qweights, scales, zeros, biases, As, R)


def reference_group(x: Tensor, qweights: list[Tensor], scales: list[Tensor], zeros: list[Tensor],
                    biases: list[Optional[Tensor]], As: list[Optional[Tensor]], R: Optional[Tensor]) -> list[Tensor]:
    """Pure torch: every member through ``reference_linear``."""
    return [reference_linear(x, q, s, z, b, A, R) for q, s, z, b, A in zip(qweights, scales, zeros, biases, As)]


@custom_op("glowq::w4a16_group_projected", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def w4a16_group_projected(x: Tensor, qweights: list[Tensor], scales: list[Tensor], zeros: list[Tensor],
                          biases: list[Optional[Tensor]], As: list[Tensor], B: Tensor) -> list[Tensor]:
    """``w4a16_group`` whose ``R = x B^T`` the op makes itself (every member has its ``A``): on CUDA
    half / bfloat16 for one row inside the GEMV's launch where that measured faster
    (``launch_w4a16_projected``), else ``shared_projection``'s arithmetic, then the group's."""
    _check_projected(x, qweights, scales, zeros, biases, As, B)
    if _uses_kernels(x):
        return launch_w4a16_projected(x, qweights, scales, zeros, biases, [widen_factor(A, x) for A in As],
                                      widen_factor(B, x))
    return reference_group(x, qweights, scales, zeros, biases, As, projection_product(x, B))


def _check_projected(x: Tensor, qweights, scales, zeros, biases, As, B: Tensor) -> Tensor:
    """The checks of ``w4a16_group`` with ``R`` to come from ``B``; returns an empty tensor shaped
    like that ``R`` (what the member checks compare ``A`` with)."""
    _check_projection(x, B)
    n = len(qweights)
    if n == 0 or not (len(scales) == len(zeros) == len(biases) == len(As) == n):
        raise ValueError(f"w4a16_group_projected needs one qweight/scales/zeros/bias/A per member, got lengths "
                         f"{[len(qweights), len(scales), len(zeros), len(biases), len(As)]}")
    R_like = x.new_empty(*x.shape[:-1], B.shape[0])
    for i in range(n):
        _check_member(i, x, qweights[i], scales[i], zeros[i], biases[i], As[i], R_like)
    return R_like


@w4a16_group_projected.register_fake
def _(x, qweights, scales, zeros, biases, As, B):
    _check_projected(x, qweights, scales, zeros, biases, As, B)
    return [x.new_empty(*x.shape[:-1], q.shape[1]) for q in qweights]


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


def _check_int4pack(x: Tensor, qweight: Tensor, int4pack: Tensor, scales_zeros: Tensor) -> None:
    """The converted weight must be one CPU kernel's layout of this weight (``cpu_int4.convert``):
    uint8 (N, K_whole / 2) codes (whole groups), and float32 (2, N, n_groups) ``[s, s z]`` (our
    GEMV) or bfloat16 (n_groups, N, 2) ``[scale, zero]`` (PyTorch's kernel)."""
    n_groups = scales_zeros.shape[-1 if scales_zeros.dtype == torch.float32 else 0] if scales_zeros.dim() == 3 else 1
    N, K = qweight.shape[1], whole_group_columns(qweight, n_groups)
    if int4pack.dtype != torch.uint8 or tuple(int4pack.shape) != (N, K // 2):
        raise ValueError(f"int4pack must be uint8 ({N}, {K // 2}) (cpu_int4.convert of this weight), got "
                         f"{int4pack.dtype} {tuple(int4pack.shape)}")
    expected = {torch.float32: (2, N), cpu_int4.KERNEL_DTYPE: (N, 2)}
    shape = tuple(scales_zeros.shape)
    if scales_zeros.dtype not in expected or scales_zeros.dim() != 3 or \
            (shape[:2] if scales_zeros.dtype == torch.float32 else shape[1:]) != expected[scales_zeros.dtype]:
        raise ValueError(f"scales_zeros must be float32 (2, {N}, n_groups) (our CPU GEMV) or "
                         f"{cpu_int4.KERNEL_DTYPE} (n_groups, {N}, 2) (PyTorch's int4 kernel), got "
                         f"{scales_zeros.dtype} {shape}")
    for name, t in (("int4pack", int4pack), ("scales_zeros", scales_zeros)):
        _check_device("", name, t, x)


def int4pack_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                    A: Optional[Tensor], R: Optional[Tensor], int4pack: Tensor, scales_zeros: Tensor) -> Tensor:
    """``glowq::w4a16_linear_int4pack``'s arithmetic (its body, and the decomposition
    ``glowq_backend`` hands Inductor on the CPU): decode rows through the CPU kernel the weight was
    converted for: our GEMV adds the bias and ``R A^T`` inside, in float32; after PyTorch's kernel
    they are added in ``x``'s dtype. More rows dequantize and run the float GEMM."""
    _check_member(-1, x, qweight, scales, zeros, bias, A, R)
    _check_int4pack(x, qweight, int4pack, scales_zeros)
    if not cpu_int4.prefers_int4_kernel(x.numel() // max(x.shape[-1], 1), scales_zeros):
        return reference_linear(x, qweight, scales, zeros, bias, A, R)
    if cpu_int4.kernel_of(scales_zeros) == "glowq":
        return cpu_gemv.matmul(x, int4pack, scales_zeros, group_size_of(qweight, scales), bias, A, R)
    y = cpu_int4.int4_matmul(x, int4pack, scales_zeros, group_size_of(qweight, scales))
    if bias is not None:
        y = y + bias
    return y if A is None else y + F.linear(R, widen_factor(A, R))


@custom_op("glowq::w4a16_linear_int4pack", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def w4a16_linear_int4pack(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                          A: Optional[Tensor], R: Optional[Tensor], int4pack: Tensor, scales_zeros: Tensor) -> Tensor:
    """``w4a16_linear`` on the CPU through PyTorch's int4 kernel (see ``int4pack_linear``)."""
    return int4pack_linear(x, qweight, scales, zeros, bias, A, R, int4pack, scales_zeros)


@w4a16_linear_int4pack.register_fake
def _(x, qweight, scales, zeros, bias, A, R, int4pack, scales_zeros):
    _check_member(-1, x, qweight, scales, zeros, bias, A, R)
    _check_int4pack(x, qweight, int4pack, scales_zeros)
    return x.new_empty(*x.shape[:-1], qweight.shape[1])


# ---- the experts of an MoE block: rows sorted by expert --------------------------------------------------------


def _check_slots(E: int, slots: Optional[Tensor], factor: Optional[Tensor], name: str, x: Tensor) -> None:
    if slots is None:
        return
    if factor is None:
        raise ValueError(f"slots say which {name} row is each expert's, but no {name} was given")
    if slots.dim() != 1 or slots.shape[0] != E or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be ({E},) integers (each expert's row of {name}, -1 for none), got "
                         f"{slots.dtype} {tuple(slots.shape)}")
    _check_device("", "slots", slots, x)


def _check_experts(x: Tensor, offsets: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
                   bias: Optional[Tensor], A: Optional[Tensor], R: Optional[Tensor],
                   slots: Optional[Tensor] = None) -> None:
    if x.dim() != 2:
        raise ValueError(f"the experts' rows must be (rows, features), got x of shape {tuple(x.shape)}")
    if qweight.dim() != 3 or qweight.dtype != torch.int32:
        raise ValueError(f"experts' qweight must be int32 (E, K_pad/8, N), got {qweight.dtype} {tuple(qweight.shape)}")
    E = qweight.shape[0]
    if offsets.dim() != 1 or offsets.shape[0] != E or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be ({E},) integers (each expert's end row), got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    _check_device("", "offsets", offsets, x)
    _check_slots(E, slots, A, "A", x)
    for name, t in (("scales", scales), ("zeros", zeros), ("bias", bias), ("A", A if slots is None else None)):
        if t is not None and (t.dim() < 1 or t.shape[0] != E):
            raise ValueError(f"experts' {name} must have one entry per expert ({E}), got {tuple(t.shape)}")
    if A is not None and (A.dim() < 1 or A.shape[0] == 0):
        raise ValueError(f"experts' A must hold at least one expert's factor, got {tuple(A.shape)}")
    _check_member(-1, x, qweight[0], scales[0], zeros[0], None if bias is None else bias[0],
                  None if A is None else A[0], R)


def _expert_slots(E: int, slots: Optional[Tensor], held: int) -> list[int]:
    """Each expert's row of a stacked factor (every expert its own row without ``slots``), checked."""
    if slots is None:
        return list(range(E))
    out = slots.tolist()
    if any(not -1 <= s < held for s in out):
        raise ValueError(f"slots {out} must be -1 (no correction) or rows of the {held} stacked factors")
    return out


def reference_experts(x: Tensor, offsets: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
                      bias: Optional[Tensor], A: Optional[Tensor], R: Optional[Tensor],
                      slots: Optional[Tensor] = None) -> Tensor:
    """Pure torch: each expert's rows through ``reference_linear``; rows past the last offset are zero."""
    out = x.new_zeros(x.shape[0], qweight.shape[-1])
    ends = offsets.tolist()
    if ends and (ends[-1] > x.shape[0] or any(b < a for a, b in zip([0, *ends], ends))):
        raise ValueError(f"offsets {ends} are not nondecreasing row ends within the {x.shape[0]} rows")
    rows = _expert_slots(len(ends), slots, 0 if A is None else A.shape[0])
    for e, (lo, hi) in enumerate(zip([0, *ends], ends)):
        if hi > lo:
            own = A is not None and rows[e] >= 0
            out[lo:hi] = reference_linear(x[lo:hi], qweight[e], scales[e], zeros[e], None if bias is None else bias[e],
                                          A[rows[e]] if own else None, R[lo:hi] if own else None)
    return out


@custom_op("glowq::w4a16_experts", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def w4a16_experts(x: Tensor, offsets: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
                  bias: Optional[Tensor], A: Optional[Tensor], R: Optional[Tensor],
                  slots: Optional[Tensor] = None) -> Tensor:
    """The experts of one 3-D weight on rows sorted by expert: rows ``offsets[e-1]:offsets[e]`` of
    ``x`` (M, K) get ``x deq(qweight[e])^T + R A[e]^T (+ bias[e])``; rows past ``offsets[-1]``
    (tokens no expert here serves) are zero. ``R`` (M, r) is the rows' projection (the experts'
    shared ``B`` applied once to every token, gathered), ``A`` (E, N, r), or with ``slots`` (E,)
    (E_A, N, r) and expert ``e``'s correction ``A[slots[e]]`` (none where ``slots[e]`` is -1)."""
    _check_experts(x, offsets, qweight, scales, zeros, bias, A, R, slots)
    if _uses_kernels(x):
        return launch_w4a16_experts(x, offsets, qweight, scales, zeros, bias, widen_factor(A, x), R, slots=slots)
    return reference_experts(x, offsets, qweight, scales, zeros, bias, A, R, slots)


@w4a16_experts.register_fake
def _(x, offsets, qweight, scales, zeros, bias, A, R, slots=None):
    _check_experts(x, offsets, qweight, scales, zeros, bias, A, R, slots)
    return x.new_empty(x.shape[0], qweight.shape[-1])


def _check_experts_projection(x: Tensor, offsets: Tensor, B: Tensor, slots: Optional[Tensor] = None) -> None:
    E = offsets.shape[0]
    _check_slots(E, slots, B, "B", x)
    if B.dim() != 3 or (B.shape[0] != E if slots is None else B.shape[0] == 0):
        raise ValueError(f"B must be (E={E}, rank, K){' (or fewer experts with slots)' if slots is not None else ''}, "
                         f"got {tuple(B.shape)}")
    _check_projection(x, B[0])


@custom_op("glowq::experts_projection", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def experts_projection(x: Tensor, offsets: Tensor, B: Tensor, slots: Optional[Tensor] = None) -> Tensor:
    """Each expert's own right factor on its rows: rows ``offsets[e-1]:offsets[e]`` of ``x`` (M, K)
    get ``x B[e]^T`` (B (E, r, K); with ``slots``, ``B[slots[e]]`` and zero where it is -1); rows
    past ``offsets[-1]`` are zero. On CUDA half / bfloat16 one grouped launch (no host sync: CUDA
    graphs can capture it), elsewhere a loop over experts."""
    _check_experts_projection(x, offsets, B, slots)
    if _uses_kernels(x):
        return launch_experts_projection(x, offsets, widen_factor(B, x), slots=slots)
    out = x.new_zeros(x.shape[0], B.shape[1])
    ends = offsets.tolist()
    rows = _expert_slots(len(ends), slots, B.shape[0])
    for e, (lo, hi) in enumerate(zip([0, *ends], ends)):
        if hi > lo and rows[e] >= 0:
            out[lo:hi] = F.linear(x[lo:hi], widen_factor(B[rows[e]], x))
    return out


@experts_projection.register_fake
def _(x, offsets, B, slots=None):
    _check_experts_projection(x, offsets, B, slots)
    return x.new_empty(x.shape[0], B.shape[1])
