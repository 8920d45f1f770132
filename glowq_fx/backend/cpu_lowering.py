"""The ``glowq::`` ops as aten ops, for Inductor on the CPU.

On the CPU ``glowq_backend`` replaces each dense ``glowq::`` op node of the rewritten graph by a
call of its decomposition (``lower_to_aten``), which AOTAutograd traces into aten ops, so that
Inductor lowers what they compute itself. Where our CPU GEMVs load (``kernels.cpu_gemv``), decode
rows become their extern calls: one ``R = x B^T`` per group (``dense_gemv``) and per member one
``w4a16_gemv`` with the bias and ``R A^T`` added inside; else PyTorch's int4 matmul
(``aten._weight_int4pack_mm_for_cpu``, which Inductor lowers to its own int4 kernel call, or
autotunes against its C++ micro-GEMM under ``max-autotune`` on AVX-512), the group's one
``R = x B^T``, and the bias and ``R A_i^T`` as an epilogue it fuses with the casts; for decode rows
the two low-rank products are written as reductions over the rank, which Inductor fuses into its
own loops (``low_rank_product``). The reference path (shapes the int4 kernel cannot take, and
prefill) is dequantize + GEMM, where Inductor fuses the unpacking into one loop. The experts' ops
stay opaque: their rows per expert are data, read on the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glowq_fx import ops
from glowq_fx.kernels import cpu_gemv, cpu_int4

# Decode rows: a low-rank product (rank r, a few rows) as a broadcast multiply and a sum over r,
# which Inductor compiles into one vectorised loop fused with the factor's widening and the add;
# as an extern GEMM it cost 2-3x more per call at these shapes (2-core AVX2 machine, 30 products in
# one graph: R A^T with A 1536 x 64 bf16 at one row 61 -> 23 us, x B^T with B 64 x 576 30 -> 12 us).
# From about 16 rows the GEMM is as fast or faster.
ROWWISE_MAX_ROWS = 8


def low_rank_product(x, factor):
    """``x factor^T`` for a low-rank factor (``B``: x is the input; ``A``: x is ``R``), in ``x``'s dtype."""
    factor = ops.widen_factor(factor, x)
    if x.numel() // max(x.shape[-1], 1) <= ROWWISE_MAX_ROWS:
        return (x.unsqueeze(-2) * factor).sum(-1)
    return F.linear(x, factor)


def _with_epilogue(y, A, R):
    return y if A is None else y + low_rank_product(R, A)


def _projection(x, B):
    ops._check_projection(x, B)
    if cpu_gemv.serves(x):  # our GEMV, as the eager op runs it
        return ops.projection_product(x, B)
    return low_rank_product(x, B)


def _linear(x, qweight, scales, zeros, bias, A, R):
    ops._check_member(-1, x, qweight, scales, zeros, bias, A, R)
    return _with_epilogue(ops.reference_linear(x, qweight, scales, zeros, bias, None, None), A, R)


def _int4pack_linear(x, qweight, scales, zeros, bias, A, R, int4pack, scales_zeros):
    ops._check_member(-1, x, qweight, scales, zeros, bias, A, R)
    if cpu_int4.kernel_of(scales_zeros) == "glowq":  # our GEMV adds the correction inside
        return ops.int4pack_linear(x, qweight, scales, zeros, bias, A, R, int4pack, scales_zeros)
    y = ops.int4pack_linear(x, qweight, scales, zeros, bias, None, None, int4pack, scales_zeros)
    return _with_epilogue(y, A, R)


def _group(x, qweights, scales, zeros, biases, As, R):
    for i in range(len(qweights)):
        ops._check_member(i, x, qweights[i], scales[i], zeros[i], biases[i], As[i], R)
    return [_with_epilogue(ops.reference_linear(x, q, s, z, b, None, None), A, R)
            for q, s, z, b, A in zip(qweights, scales, zeros, biases, As)]


def _projected_group(x, qweights, scales, zeros, biases, As, B):
    ops._check_projected(x, qweights, scales, zeros, biases, As, B)
    return _group(x, qweights, scales, zeros, biases, As, low_rank_product(x, B))


def lower_to_aten(gm: torch.fx.GraphModule) -> int:
    """Point every dense ``glowq::`` op node of ``gm`` at its decomposition (in place; the graph
    itself then differs from the opaque one, so no compile cache mixes the two). Returns how
    many nodes changed."""
    table = cpu_decompositions()
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in table:
            node.target = table[node.target]
            changed += 1
    if changed:
        gm.recompile()
    return changed


def cpu_decompositions() -> dict:
    """op overload -> its aten decomposition, for the dense ``glowq::`` ops."""
    glowq = torch.ops.glowq
    return {glowq.shared_projection.default: _projection,
            glowq.w4a16_linear.default: _linear,
            glowq.w4a16_linear_int4pack.default: _int4pack_linear,
            glowq.w4a16_group.default: _group,
            glowq.w4a16_group_projected.default: _projected_group}
