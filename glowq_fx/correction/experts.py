"""Low-rank correction of an MoE block's experts: GlowQ across experts and its baselines.

Every expert of a block reads rows of the same token stream ``x`` (the block input), so the
first projection of all experts (``gate_up`` of expert ``e``: ``E_e = W_e - W_q,e``, (2I, H))
and any dense linear reading the same input (a shared expert's gate/up) form one input-sharing
group: one ``B`` (r, H) from the stacked errors whitened by the block's ``S = E[x x^T]`` over
every token entering the block, and one ``A_e`` per expert. At run time ``R = B x`` is computed
once for all tokens, before dispatch, and each expert's rows add ``A_e R_e``.

Beyond the plain stack (``decompose.solve("glowq", ...)``):

- usage-weighted: each expert's error scaled by ``sqrt(f_e)`` (its routing frequency) before
  stacking, so that ``B`` spends its rank where tokens go, and ``A_e`` scaled back by
  ``1 / sqrt(f_e)`` after (the paper's reference code forgets this second step, leaving every
  ``A_e`` scaled by its own frequency). An expert no calibration token reached (``f_e = 0``)
  takes the refit below against the block ``S``.
- refit: with ``B`` fixed, each ``A_e`` in closed form against ``S_e``, the second moment of
  the tokens routed to expert ``e`` (the optimum of that expert's own objective):
  ``A_e = E_e S_e B^T (B S_e B^T)^{-1}``.

The baseline ``independent_experts`` solves each expert alone (QERA: its own ``A_e, B_e``
whitened by its own ``S_e``), storing ``E`` right factors instead of one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from glowq_fx.correction.decompose import LowRankCorrection, shrink_, solve, whitened_error


def refit_left(E: Tensor, B: Tensor, S: Tensor, shrinkage: float = 0.0) -> Tensor:
    """``argmin_A || (E - A B) S_a^{1/2} ||_F`` for a fixed ``B`` (r, d): ``E S_a B^T (B S_a B^T)^{-1}``,
    with ``S_a`` = ``S`` shrunk by ``shrinkage`` (float64 inside, ``E``'s dtype out)."""
    if B.shape[0] == 0:
        return E.new_zeros(E.shape[0], 0)
    Sa = shrink_(S.to(device=E.device, dtype=torch.float64, copy=True), shrinkage)
    B64 = B.to(torch.float64)
    SB = Sa @ B64.T  # (d, r)
    gram = B64 @ SB  # (r, r), positive definite when B has full row rank and S_a is
    rhs = E.to(torch.float64) @ SB  # (m, r)
    L, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        A = torch.cholesky_solve(rhs.T, L).T
    else:  # a rank-deficient gram (an S that sees nothing of some direction of B): least squares
        A = torch.linalg.lstsq(gram, rhs.T).solution.T
    return A.to(E.dtype)


def removed_error(A: Tensor, B: Tensor, E: Tensor, S: Tensor) -> float:
    """``tr(E S E^T) - tr((E - A B) S (E - A B)^T)``, the whitened error the correction ``A B``
    removes from ``E`` under ``S``, as ``2 <A, E S B^T> - <A^T A, B S B^T>`` (float64): products
    with the rank-``r`` factors, never an (out, in) x (in, in) one."""
    A64, B64 = A.double(), B.to(device=A.device, dtype=torch.float64)
    SB = S.to(device=A.device, dtype=torch.float64) @ B64.T  # (in, r)
    return float(2 * (A64 * (E.to(device=A.device, dtype=torch.float64) @ SB)).sum()
                 - ((A64.T @ A64) * (B64 @ SB)).sum())


def experts_lowrank(errors: Sequence[Tensor], S: Tensor, rank: int, *, usage: Sequence[float] | None = None,
                    refit: Sequence[Tensor | None] | None = None, shrinkage: float = 0.05,
                    method: str = "glowq", **solve_kwargs) -> LowRankCorrection:
    """GlowQ across experts: one ``B`` for every member's error (module docstring).

    Args:
        errors: ``E_i`` (d_out_i, d_in) of each member: the experts' first projections, then any
            dense linear reading the same input.
        S: the block input's second moment (every token), (d_in, d_in).
        rank: r of the shared ``B``.
        usage: one weight per member (routing frequency ``f_e``; 1 for a dense member): errors
            scaled by ``sqrt(w)`` before stacking, ``A_i`` by ``1 / sqrt(w)`` after.
        refit: one entry per member, ``S_e`` to refit that member's ``A_i`` against with ``B``
            fixed, or None to keep it.
        method: a registered correction with a shared ``B`` (``decompose.solve`` solves the stack).
        shrinkage, solve_kwargs: as ``decompose.solve``.

    Returns:
        ``LowRankCorrection`` (shared); its report's errors are those of the final factors,
        measured with the block ``S``.
    """
    n = len(errors)
    for what, given in (("usage", usage), ("refit", refit)):
        if given is not None and len(given) != n:
            raise ValueError(f"{what} needs one entry per member ({n}), got {len(given)}")
    weights = [1.0] * n if usage is None else [float(w) for w in usage]
    if any(w < 0 or w != w for w in weights):
        raise ValueError(f"usage weights must be non-negative numbers, got {weights}")
    scaled = [E if w == 1.0 else E * w**0.5 for E, w in zip(errors, weights)]
    corr = solve(method, scaled, S, rank, shrinkage=shrinkage, **solve_kwargs)
    if not corr.shared:
        raise ValueError(f"experts_lowrank shares one B across the experts: method {method!r} solves each member "
                         "alone (use independent_experts)")
    B = corr.B[0]
    dtype = B.dtype
    As = []
    for i, (E, A, w) in enumerate(zip(errors, corr.A, weights)):
        target = None if refit is None else refit[i]
        if target is not None:
            A = refit_left(E.to(dtype), B, target, shrinkage)
        elif w == 0.0:  # no token reached it: the least-squares A against the block's S
            A = refit_left(E.to(dtype), B, S, shrinkage)
        elif w != 1.0:
            A = A / w**0.5
        As.append(A)
    if usage is not None or refit is not None:
        S_eval = S.to(device=B.device, dtype=dtype)
        after = [whitened_error(E.to(dtype) - A @ B, S_eval) for E, A in zip(errors, As)]
        before = [whitened_error(E.to(dtype), S_eval) for E in errors]
        rep = corr.report
        rep.member_errors_before, rep.member_errors_after = before, after
        rep.whitened_error_before, rep.whitened_error_after = sum(before), sum(after)
        rep.method = "glowq-experts"
    return LowRankCorrection(A=As, B=[B], shared=True, report=corr.report)


def independent_experts(errors: Sequence[Tensor], S_experts: Sequence[Tensor | None], S: Tensor, rank: int,
                        **solve_kwargs) -> list[LowRankCorrection]:
    """The baseline: each expert alone, QERA whitened by its own ``S_e`` (the block ``S`` for an
    expert that no calibration token reached), capped at what its error holds."""
    if len(S_experts) != len(errors):
        raise ValueError(f"one S_e per expert: {len(errors)} errors, {len(S_experts)} second moments")
    return [solve("qera", [E], S if S_e is None else S_e, min(rank, *E.shape), **solve_kwargs)
            for E, S_e in zip(errors, S_experts)]
