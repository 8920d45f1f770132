"""correction.experts: GlowQ across the experts of an MoE block (plain, usage-weighted, A_e refit)
and the independent per-expert baseline, on fresh random errors and second moments."""
import pytest
import torch

from glowq_fx.correction.decompose import solve, whitened_error
from glowq_fx.correction.experts import experts_lowrank, independent_experts, refit_left


def _moment(d, n, g):
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    return X.T @ X / n


def _block(seed=0, n_experts=4, out=12, d=10):
    g = torch.Generator().manual_seed(seed)
    errors = [torch.randn(out, d, generator=g, dtype=torch.float64) for _ in range(n_experts)]
    S_experts = [_moment(d, 40, g) for _ in range(n_experts)]
    return errors, S_experts, sum(S_experts) / n_experts


def _objective(E, A, B, S):
    return whitened_error(E - A @ B, S)


EXACT = dict(shrinkage=0.0, mode="exact", dtype=torch.float64)


def test_without_options_it_is_glowq_on_the_stack():
    errors, _, S = _block()
    a, b = experts_lowrank(errors, S, 5, **EXACT), solve("glowq", errors, S, 5, **EXACT)
    assert torch.equal(a.B[0], b.B[0]) and all(torch.equal(x, y) for x, y in zip(a.A, b.A))


@pytest.mark.parametrize("options", [{}, {"usage": [0.5, 0.1, 0.0, 0.4]}, {"refit": "experts"}])
def test_full_rank_reconstructs_every_expert_exactly(options):
    errors, S_experts, S = _block(seed=1)
    if options.get("refit"):
        options = {"refit": S_experts}
    corr = experts_lowrank(errors, S, errors[0].shape[1], **options, **EXACT)
    for E, A in zip(errors, corr.A):
        torch.testing.assert_close(A @ corr.B[0], E, rtol=1e-9, atol=1e-9)


def test_usage_weighting_scales_back_and_is_optimal_for_the_weighted_objective():
    errors, _, S = _block(seed=2)
    w = [0.55, 0.25, 0.15, 0.05]
    weighted = experts_lowrank(errors, S, 4, usage=w, **EXACT)
    plain = experts_lowrank(errors, S, 4, **EXACT)
    stacked = solve("glowq", [E * wi**0.5 for E, wi in zip(errors, w)], S, 4, **EXACT)
    for wi, A, A_scaled in zip(w, weighted.A, stacked.A):  # the second step the reference code forgets
        torch.testing.assert_close(A * wi**0.5, A_scaled)

    def weighted_objective(c):
        return sum(wi * _objective(E, A, c.B[0], S) for wi, E, A in zip(w, errors, c.A))

    assert weighted_objective(weighted) < weighted_objective(plain)


def test_an_expert_no_token_reached_gets_the_least_squares_fit():
    errors, _, S = _block(seed=3)
    corr = experts_lowrank(errors, S, 4, usage=[0.5, 0.5, 0.0, 0.0], **EXACT)
    B = corr.B[0]
    for E, A in zip(errors[2:], corr.A[2:]):
        torch.testing.assert_close(A, refit_left(E, B, S))
        # optimality: the gradient of tr((E - A B) S (E - A B)^T) in A vanishes
        torch.testing.assert_close((E - A @ B) @ S @ B.T, torch.zeros(E.shape[0], 4, dtype=torch.float64),
                                   atol=1e-9, rtol=0)


def test_refit_is_optimal_for_each_experts_own_tokens():
    errors, S_experts, S = _block(seed=4)
    plain = experts_lowrank(errors, S, 3, **EXACT)
    refit = experts_lowrank(errors, S, 3, refit=S_experts, **EXACT)
    assert torch.equal(plain.B[0], refit.B[0])  # B fixed
    for E, S_e, A0, A1 in zip(errors, S_experts, plain.A, refit.A):
        assert _objective(E, A1, refit.B[0], S_e) <= _objective(E, A0, plain.B[0], S_e) * (1 + 1e-12)
        torch.testing.assert_close((E - A1 @ refit.B[0]) @ S_e @ refit.B[0].T,
                                   torch.zeros(E.shape[0], 3, dtype=torch.float64), atol=1e-9, rtol=0)
    # the report measures the final factors with the block S
    assert refit.report.member_errors_after == pytest.approx(
        [_objective(E, A, refit.B[0], S) for E, A in zip(errors, refit.A)])


def test_independent_experts_each_whitened_by_its_own_tokens():
    errors, S_experts, S = _block(seed=5)
    S_experts[1] = None  # no token reached expert 1: the block S stands in
    solved = independent_experts(errors, S_experts, S, 3, **EXACT)
    for E, S_e, c in zip(errors, S_experts, solved):
        reference = solve("qera", [E], S if S_e is None else S_e, 3, **EXACT)
        assert torch.equal(c.A[0], reference.A[0]) and torch.equal(c.B[0], reference.B[0])
    full = independent_experts(errors, S_experts, S, 10, **EXACT)
    for E, c in zip(errors, full):
        torch.testing.assert_close(c.A[0] @ c.B[0], E, rtol=1e-9, atol=1e-9)


def test_bad_options_are_refused():
    errors, S_experts, S = _block()
    with pytest.raises(ValueError, match="usage needs one entry per member"):
        experts_lowrank(errors, S, 2, usage=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        experts_lowrank(errors, S, 2, usage=[1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="one S_e per expert"):
        independent_experts(errors, S_experts[:2], S, 2)
