"""The ``glowq::`` ops as aten ops, for Inductor on the CPU.

On the CPU ``glowq_backend`` replaces each dense ``glowq::`` op node of the rewritten graph by a
call of its decomposition (``lower_to_aten``), which AOTAutograd traces into aten ops, so that
Inductor lowers what they compute itself: PyTorch's int4 matmul
(``aten._weight_int4pack_mm_for_cpu``, which Inductor lowers to its own int4 kernel call, or
autotunes against its C++ micro-GEMM under ``max-autotune`` on AVX-512), the group's one
``R = x B^T`` as a GEMM, and the bias and ``R A_i^T`` as an epilogue it fuses with the casts. The
reference path (shapes the int4 kernel cannot take, and prefill) is dequantize + GEMM, where
Inductor fuses the unpacking into one loop. The experts' ops stay opaque: their rows per expert
are data, read on the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glowq_fx import ops


def _projection(x, B):
    ops._check_projection(x, B)
    return F.linear(x, ops.widen_factor(B, x))


def _linear(x, qweight, scales, zeros, bias, A, R):
    ops._check_member(-1, x, qweight, scales, zeros, bias, A, R)
    return ops.reference_linear(x, qweight, scales, zeros, bias, A, R)


def _group(x, qweights, scales, zeros, biases, As, R):
    for i in range(len(qweights)):
        ops._check_member(i, x, qweights[i], scales[i], zeros[i], biases[i], As[i], R)
    return ops.reference_group(x, qweights, scales, zeros, biases, As, R)


def _projected_group(x, qweights, scales, zeros, biases, As, B):
    ops._check_projected(x, qweights, scales, zeros, biases, As, B)
    return ops.reference_group(x, qweights, scales, zeros, biases, As, F.linear(x, ops.widen_factor(B, x)))


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
            glowq.w4a16_linear_int4pack.default: ops.int4pack_linear,
            glowq.w4a16_group.default: _group,
            glowq.w4a16_group_projected.default: _projected_group}
