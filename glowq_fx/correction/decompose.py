"""Low-rank error correction: GlowQ's shared solver and the independent baselines.

For a group of k linears reading one input ``x`` with second moment ``S = E[x x^T]``:

    E_cat = [E_1; ...; E_k]                      (m = sum d_out_i) x d_in
    min_{A,B} || (E_cat - A B) S^{1/2} ||_F^2    rank r

Closed form: ``M = E_cat S^{1/2} = U diag(s) V^T``, ``A = U_r diag(sqrt(s_r))`` (split by
rows into the members' ``A_i``), ``B = diag(sqrt(s_r)) V_r^T S^{-1/2}``. Because ``S`` is the
same for every member, this shared ``B`` is the exact optimum of the stacked objective; with
k = 1 it is QERA's exact solution. ``tr(D S D^T) = E ||D x||^2``, so every reported
"whitened error" is the expected squared output error per token.

Any factor ``H`` with ``H H^T = S`` gives the same objective, ``||X H||_F^2 = tr(X S X^T)``, so
the same optimum ``A B``: the solver takes the Cholesky factor ``L`` of the shrunk ``S`` (positive
definite whenever ``shrinkage > 0``) and undoes it on ``B`` by a triangular solve, ``B L^{-1}``.
That costs a fraction of the float64 eigendecomposition ``S^{1/2}`` needs (which dominated the
solve: ``benchmarks/results/blockwise_memory.md``) and, factored in float32, an eighth of its
memory. For an ``S`` that is not positive definite (possible only without shrinkage) the clamped
symmetric square root is used.

The randomized SVD (``mode="randomized"``) sketches ``M = E_cat H`` through its products alone,
member by member: ``M X = [E_i (H X)]`` and ``M^T Y = H^T sum_i E_i^T Y_i``, so neither ``E_cat`` nor
``M`` is ever formed, nor the paper's thin QR ``E_cat = Q_e R_e``. The paper reduces the tall stack
to its ``d_in x d_in`` core ``R_e H`` before sketching; since ``M X = Q_e (R_e H X)``, the sketch of
``M`` is ``Q_e`` times the sketch of the core, and the correction ``A B`` is the same in exact
arithmetic (tested against the QR-reduced algorithm). Without the reduction the products cost
``m d_in w`` each for a sketch of width ``w = r + p``, instead of the QR's ``2 m d_in^2`` and the
core's ``2 d_in^3`` (for an 8B gate/up group, m = 28672, d_in = 4096: ~150 GFLOP against ~1
TFLOP), and no ``m x d_in`` buffer is made (the stacked error, its QR's copy and ``Q_e``: three
times the group's weights in float32 at the solve's peak). Exact SVD of the full ``M`` remains
available (``mode="exact"``) for checking.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from glowq_fx._checks import all_finite
from glowq_fx.registry import CORRECTIONS

EIG_FLOOR = 1e-8  # eigenvalues of S clamped at this fraction of the largest (numerical only;
# shrinkage is the real regulariser)


def shrink(S: Tensor, alpha: float) -> Tensor:
    """``(1 - a) S + a (tr S / d) I``: pulls S toward isotropy so ``S^{-1/2}`` stays tame."""
    return shrink_(S.clone(), alpha)


def shrink_(S: Tensor, alpha: float) -> Tensor:
    """``shrink`` in place on ``S`` (no d x d temporaries: for a 14336-wide ``S`` each is 1.6 GB
    in float64)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {alpha}")
    isotropic = alpha * torch.trace(S) / S.shape[0]
    S.mul_(1 - alpha)
    S.diagonal().add_(isotropic)
    return S


@dataclass
class Whitening:
    """A factor ``H`` of ``S`` (``H H^T = S``, or ``S`` clamped) and its inverse applied to ``B``.

    ``kind`` is ``"cholesky"`` (``H = L`` lower triangular, ``B H^{-1}`` by a triangular solve),
    ``"symmetric"`` (``H = S^{1/2}`` from a clamped eigendecomposition, ``H^{-1}`` a matrix),
    ``"diagonal"`` (``H`` a (d,) vector) or ``"identity"``.
    """

    kind: str
    H: Tensor | None = None
    H_inv: Tensor | None = None

    def scale(self, X: Tensor) -> Tensor:
        """``X H``."""
        if self.kind == "identity":
            return X
        return X * self.H if self.kind == "diagonal" else X @ self.H

    def scale_columns(self, X: Tensor) -> Tensor:
        """``H X`` (X: d x w)."""
        if self.kind == "identity":
            return X
        return self.H.unsqueeze(1) * X if self.kind == "diagonal" else self.H @ X

    def scale_columns_t(self, Y: Tensor) -> Tensor:
        """``H^T Y`` (Y: d x w)."""
        if self.kind == "identity":
            return Y
        return self.H.unsqueeze(1) * Y if self.kind == "diagonal" else self.H.T @ Y

    def unscale(self, B: Tensor) -> Tensor:
        """``B H^{-1}``."""
        if self.kind == "identity":
            return B
        if self.kind == "diagonal":
            return B * self.H_inv
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.H, B, upper=False, left=False)
        return B @ self.H_inv


def factor_whitening(S: Tensor, dtype: torch.dtype, shrinkage: float = 0.0) -> Whitening:
    """The Cholesky factor of ``shrink(S, shrinkage)`` in ``dtype`` when that is positive definite,
    else its clamped symmetric square root (``whitening``, float64).

    The factor is computed in ``dtype`` itself when it is float32 (the solver's products use it
    there anyway: a float64 factor rounded to float32 has the same backward error, ``L L^T = S_a``
    up to float32 rounding), and in float64 when float32 cannot factor ``S_a`` (too ill-conditioned)
    or ``dtype`` is float64. Working in float32 halves the buffer and skips the cast: for the
    widest group the solve's peak went from ``S`` + a float64 copy + the float32 factor (4 ``S``)
    to 2 ``S`` (``benchmarks/results/blockwise_memory.md``).

    The shrunk copy is factored in place: it is handed to LAPACK as its transpose (the same values,
    ``S`` is symmetric), which is column-major as LAPACK stores matrices; a row-major ``out`` made
    torch factor a column-major copy and copy it back (one more ``d x d`` buffer at the peak).
    """
    for work in dict.fromkeys((dtype if dtype == torch.float32 else torch.float64, torch.float64)):
        A = shrink_(S.to(work, copy=True), shrinkage).mT
        L, info = torch.linalg.cholesky_ex(A, out=(A, torch.empty((), dtype=torch.int32, device=A.device)))
        # a non-finite entry makes the sum non-finite; isfinite(L) would build d x d temporaries
        if int(info) == 0 and bool(torch.isfinite(L.sum())):
            return Whitening("cholesky", L.to(dtype))
        del A, L
    half, inv_half = whitening(shrink_(S.to(torch.float64, copy=True), shrinkage))
    return Whitening("symmetric", half.to(dtype), inv_half.to(dtype))


def whitening(S: Tensor) -> tuple[Tensor, Tensor]:
    """``(S^{1/2}, S^{-1/2})`` in float64 by symmetric eigendecomposition, eigenvalues clamped.

    Both use the same clamped eigenvalues, so ``S^{1/2} S^{-1/2} = I`` to rounding.
    """
    lam, V = torch.linalg.eigh(S.to(torch.float64))
    floor = max(float(lam.max()) * EIG_FLOOR, torch.finfo(torch.float64).tiny)
    lam = lam.clamp_min(floor)
    return (V * lam.sqrt()) @ V.T, (V * lam.rsqrt()) @ V.T


def default_oversample(rank: int) -> int:
    """Sketch oversampling used when none is given: the paper's 10 plus half the rank. The fixed 10
    left the solved objective 0.4-1.2% above exact on slowly decaying whitened spectra; the sketch
    is only d x (r + p), so the wider one costs little."""
    return rank // 2 + 10


def squared_norm(X: Tensor, rows: int = 512) -> float:
    """``||X||_F^2``, summed over blocks of ``rows`` rows in double precision: one float32 reduction
    over a whole 14336 x 4096 matrix is off by about 1% (measured), and a float64 one copies it."""
    accumulate = torch.float64 if X.dtype == torch.float64 else torch.float32  # half precision: cast per block
    return sum(float(torch.linalg.vector_norm(part, dtype=accumulate)) ** 2
               for part in X.reshape(-1, X.shape[-1]).split(rows))


def whitened_error(D: Tensor, S: Tensor, rows: int = 512) -> float:
    """``tr(D S D^T) = E ||D x||^2`` for an error ``D`` (m, d) and second moment ``S`` (d, d), summed
    over blocks of ``rows`` rows (no m x d product at once)."""
    D = D.to(S.dtype)
    return sum(float((part @ S).mul_(part).sum()) for part in D.split(rows))


def randomized_svd(
    M: Tensor, rank: int, *, oversample: int, power_iters: int = 2, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD of ``M`` (p, d) by a Gaussian sketch of ``rank + oversample`` columns
    (``sketched_svd`` of the matrix itself)."""
    return sketched_svd(M.__matmul__, M.T.__matmul__, M.shape, M.dtype, M.device, rank, oversample=oversample,
                        power_iters=power_iters, generator=generator)


def sketched_svd(
    times: Callable[[Tensor], Tensor], times_t: Callable[[Tensor], Tensor], shape: tuple[int, int],
    dtype: torch.dtype, device: torch.device, rank: int, *, oversample: int, power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD ``(U, s, Vh)`` of a (p, d) operator ``M`` known through its products,
    ``times(X) = M X`` and ``times_t(Y) = M^T Y``, by a Gaussian sketch of ``rank + oversample``
    columns. Each power iteration re-orthonormalizes (QR) after both products, so the sketch does
    not collapse onto the top singular vector in finite precision."""
    p, d = shape
    width = min(rank + oversample, p, d)
    omega = torch.randn(d, width, dtype=dtype, device=device, generator=generator)
    Q, _ = torch.linalg.qr(times(omega))
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(times_t(Q))
        Q, _ = torch.linalg.qr(times(Z))
    Ub, s, Vh = torch.linalg.svd(times_t(Q).T, full_matrices=False)  # Q^T M = (M^T Q)^T
    return (Q @ Ub)[:, :rank], s[:rank], Vh[:rank]


@dataclass
class SolveReport:
    """What one solve did.

    ``whitened_error_*`` are ``tr(D S D^T)`` with the raw ``S`` (expected squared output error
    per token); ``objective_*`` use the shrunk ``S_a`` that GlowQ and QERA minimize (for them
    exact SVD is optimal in this measure, not necessarily in the raw one).
    """

    method: str
    rank: int
    whitened_error_before: float
    whitened_error_after: float
    objective_before: float
    objective_after: float
    captured_energy: float  # sum of kept s^2 of the (shrunk, scaled) objective
    singular_values: list[Tensor] = field(repr=False)  # kept s, one tensor per factorization
    time_s: float = 0.0  # the whole solve, whitening included
    whitening_time_s: float = 0.0  # the factorization of S (Cholesky, or float64 eigendecomposition)
    member_errors_before: list[float] = field(default_factory=list)  # tr(E_i S E_i^T) per member
    member_errors_after: list[float] = field(default_factory=list)

    @property
    def relative_error_after(self) -> float:
        return self.whitened_error_after / self.whitened_error_before if self.whitened_error_before else 0.0


@dataclass
class LowRankCorrection:
    """Factors of a group's correction ``E_i ~ A_i B_i``.

    Attributes:
        A: one (d_out_i, r) tensor per member.
        B: ``[B]`` (r, d_in) when shared (GlowQ), else one (r, d_in) per member.
        report: errors, captured energy and time of the solve.
    """

    A: list[Tensor]
    B: list[Tensor]
    shared: bool
    report: SolveReport

    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        """``(A_i, B_i)`` of member ``i`` (``B_i`` is the shared ``B`` for GlowQ)."""
        return self.A[i], self.B[0 if self.shared else i]

    def nbytes(self, element_size: int = 2) -> int:
        """Bytes of the factors stored at ``element_size`` bytes per value (2: fp16/bf16)."""
        return sum(t.numel() for t in [*self.A, *self.B]) * element_size


def _check_group(errors: Sequence[Tensor], S: Tensor, rank: int) -> int:
    if len(errors) == 0:
        raise ValueError("a group needs at least one member error matrix")
    d = errors[0].shape[-1]
    for i, E in enumerate(errors):
        if E.dim() != 2:
            raise ValueError(f"member {i}: error must be 2-D (out, in), got shape {tuple(E.shape)}")
        if E.shape[1] != d:
            raise ValueError(
                f"member {i} has in_features {E.shape[1]} but member 0 has {d}: members of one group "
                "must read the same input"
            )
        if E.dtype != errors[0].dtype:
            raise ValueError(f"member {i} has dtype {E.dtype} but member 0 has {errors[0].dtype}")
    if S.shape != (d, d):
        raise ValueError(f"S must be ({d}, {d}) for members with in_features {d}, got {tuple(S.shape)}")
    if not all_finite(S):
        raise ValueError("S contains NaN or Inf; the calibration activations were not finite")
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    return d


def scaled_lowrank(
    errors: Sequence[Tensor], whitened: Whitening, rank: int, *, mode: str,
    oversample: int, power_iters: int, generator: torch.Generator | None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Best rank-``rank`` ``A B`` for ``|| (E_cat - A B) H ||_F``, ``E_cat`` the ``errors`` stacked
    by rows and ``H`` the ``whitened`` factor; the randomized SVD sketches ``E_cat H`` member by
    member (module docstring).

    Returns ``(A, B, s)``: ``A`` split by member rows, and the kept singular values ``s``.
    """
    rows = [E.shape[0] for E in errors]
    m, d = sum(rows), errors[0].shape[1]
    limit = min(m, d)
    if rank > limit:
        raise ValueError(
            f"rank {rank} exceeds the largest rank a ({m} x {d}) error allows ({limit}); lower the rank"
        )
    if mode == "exact":
        U, s, Vh = torch.linalg.svd(whitened.scale(errors[0] if len(errors) == 1 else torch.cat(errors)),
                                    full_matrices=False)
        U, s, Vh = U[:, :rank], s[:rank], Vh[:rank]
    elif mode == "randomized":
        def times(X: Tensor) -> Tensor:  # E_cat H X
            HX = whitened.scale_columns(X)
            return torch.cat([E @ HX for E in errors])

        def times_t(Y: Tensor) -> Tensor:  # H^T E_cat^T Y
            EtY = errors[0].T @ Y[: rows[0]]
            start = rows[0]
            for E in errors[1:]:
                EtY.addmm_(E.T, Y[start:start + E.shape[0]])
                start += E.shape[0]
            return whitened.scale_columns_t(EtY)

        U, s, Vh = sketched_svd(times, times_t, (m, d), errors[0].dtype, errors[0].device, rank,
                                oversample=oversample, power_iters=power_iters, generator=generator)
    else:
        raise ValueError(f"unknown SVD mode {mode!r}: use 'randomized' or 'exact'")
    root = s.sqrt()
    return list((U * root).split(rows)), whitened.unscale(root.unsqueeze(1) * Vh), s


def solve(
    method: str,
    errors: Sequence[Tensor],
    S: Tensor,
    rank: int,
    *,
    shrinkage: float = 0.05,
    mode: str = "randomized",
    oversample: int | None = None,
    power_iters: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    cap_rank: bool = False,
) -> LowRankCorrection:
    """Correct a group's quantization errors with ``method`` at ``rank``.

    Args:
        method: a name in ``glowq_fx.registry.CORRECTIONS`` (``correction.methods``): ``"glowq"``
            (one shared B, whitened by S), ``"qera"`` (each member alone, whitened: QERA-exact),
            ``"lqer"`` (each member alone, scaled by the per-channel RMS ``sqrt(diag S)``: L2QER's
            diagonal scaling, taken from the same statistics), ``"svd"`` (each member alone, plain
            SVD of E: ZeroQuant-V2 LoRC), ``"none"``, or one registered by the user.
        errors: the members' ``E_i = W_i - W_q,i``, each (d_out_i, d_in), one dtype.
        S: the group's raw second moment (d_in, d_in); the whitened methods shrink it by
            ``shrinkage``, reports use it raw.
        rank: r (of the shared B, or of each member's independent factors).
        mode: ``"randomized"`` (the randomized SVD of the stacked whitened error, member by member)
            or ``"exact"``.
        oversample: extra sketch columns; None means ``default_oversample(rank)``.
        seed: seed of a local generator for the sketch (global RNG untouched).
        dtype: compute dtype of the factorization of S (float64 where float32 cannot factor it),
            the sketch and the SVD.
        cap_rank: independent methods give each member ``min(rank, d_out_i, d_in)`` instead of
            refusing a rank that a member's error cannot hold (``quantize_`` does, so that one
            call, one whitening of ``S``, serves the whole group).

    Returns:
        ``LowRankCorrection`` with factors in ``dtype`` on the errors' device.
    """
    handler = CORRECTIONS[method]  # a correction.method.CorrectionMethod; unknown names are refused
    _check_group(errors, S, rank)
    device = errors[0].device
    S = S.to(device)
    Es = [E.to(dtype) for E in errors]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    if not handler.corrects or rank == 0:
        A = [E.new_zeros(E.shape[0], 0) for E in Es]
        B = [E.new_zeros(0, E.shape[1]) for E in Es[: 1 if handler.shared else len(Es)]]
        s_kept, whitening_s = [], 0.0
    else:
        sketch = dict(mode=mode, oversample=default_oversample(rank) if oversample is None else oversample,
                      power_iters=power_iters)
        A, B, s_kept, whitening_s = _factors(handler, Es, S, rank, shrinkage, dtype, cap_rank, seed, sketch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    report = _solve_report(handler, Es, S, A, B, s_kept, shrinkage, dtype, elapsed, whitening_s)
    return LowRankCorrection(A=A, B=B, shared=handler.shared, report=report)


def _factors(handler, Es: list[Tensor], S: Tensor, rank: int, shrinkage: float, dtype: torch.dtype, cap_rank: bool,
             seed: int, sketch: dict) -> tuple[list[Tensor], list[Tensor], list[Tensor], float]:
    """``(A, B, kept singular values, whitening seconds)``: one shared ``B`` for a shared method,
    else one per member, each member's sketch drawn from the seed (its factors do not depend on
    member order)."""
    t_white = time.perf_counter()
    whitened = handler.whiten(S, dtype, shrinkage)
    whitening_s = time.perf_counter() - t_white
    generator = torch.Generator(device=Es[0].device).manual_seed(seed)
    if handler.shared:
        A, B_shared, s = scaled_lowrank(Es, whitened, rank, generator=generator, **sketch)
        return A, [B_shared], [s], whitening_s
    solved = []
    for E in Es:
        generator.manual_seed(seed)
        A_i, B_i, s_i = scaled_lowrank([E], whitened, min(rank, *E.shape) if cap_rank else rank,
                                       generator=generator, **sketch)
        solved.append((A_i[0], B_i, s_i))
    A, B, s_kept = (list(x) for x in zip(*solved))
    return A, B, s_kept, whitening_s


def _solve_report(handler, Es: list[Tensor], S: Tensor, A: list[Tensor], B: list[Tensor], s_kept: list[Tensor],
                  shrinkage: float, dtype: torch.dtype, time_s: float, whitening_time_s: float) -> SolveReport:
    """The whitened errors (raw ``S``) and the shrunk objective before and after the correction."""
    S_eval = S.to(dtype)  # no float64 copy of S outlives the whitening
    iso = shrinkage * float(torch.diagonal(S).to(torch.float64).sum()) / S.shape[0]

    def errors_of(Ds: Iterable[Tensor]) -> tuple[list[float], float]:
        # tr(D S_a D^T) = (1 - a) tr(D S D^T) + a tr(S)/d ||D||_F^2: no second product with S_a;
        # one D at a time (they may be made on the fly)
        raw, norms = [], 0.0
        for D in Ds:
            raw.append(whitened_error(D, S_eval))
            norms += squared_norm(D)
        return raw, (1 - shrinkage) * sum(raw) + iso * norms

    members_before, obj_before = errors_of(Es)
    if all(a.shape[1] == 0 for a in A):  # nothing subtracted: the errors stay as they were
        members_after, obj_after = members_before, obj_before
    else:
        members_after, obj_after = errors_of(torch.addmm(E, A[i], B[0 if handler.shared else i], alpha=-1)
                                             for i, E in enumerate(Es))
    return SolveReport(
        method=handler.name,
        rank=max((a.shape[1] for a in A), default=0),  # as solved: capped per member
        whitened_error_before=sum(members_before),
        whitened_error_after=sum(members_after),
        objective_before=obj_before,
        objective_after=obj_after,
        captured_energy=float(sum((s.double() ** 2).sum() for s in s_kept)),
        member_errors_before=members_before,
        member_errors_after=members_after,
        singular_values=[s.float().cpu() for s in s_kept],
        time_s=time_s,
        whitening_time_s=whitening_time_s,
    )


def shared_lowrank(errors: Sequence[Tensor], S: Tensor, rank: int, **kwargs) -> LowRankCorrection:
    """GlowQ: one shared ``B`` for the group; see ``solve`` for the arguments."""
    return solve("glowq", errors, S, rank, **kwargs)


def independent_lowrank(errors: Sequence[Tensor], S: Tensor, rank: int, **kwargs) -> LowRankCorrection:
    """QERA-exact: each member solved alone with the group's ``S``; see ``solve``."""
    return solve("qera", errors, S, rank, **kwargs)
