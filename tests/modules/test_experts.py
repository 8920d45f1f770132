"""modules.experts: QuantizedExpertWeights against a float64 reference on fresh random experts,
experts no token reaches, and the checks on what is attached."""
import pytest
import torch

from glowq_fx.capture.experts import experts_protocol
from glowq_fx.kernels.layout import pack
from glowq_fx.modules.experts import QuantizedExpertWeights
from glowq_fx.modules.linear import SharedProjection
from glowq_fx.quant import quantize_rtn


def _weights(E=3, N=40, K=64, r=5, shared=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    Ws = [torch.randn(N, K, generator=g) for _ in range(E)]
    b = torch.randn(E, N, generator=g) if bias else None
    w = QuantizedExpertWeights([pack(quantize_rtn(W, 32)) for W in Ws], b)
    A = torch.randn(E, N, r, generator=g) / r
    if shared:
        projection = SharedProjection(torch.randn(r, K, generator=g) / K**0.5, ("experts.gate_up_proj",))
        w.set_correction(A, projection=projection)
    else:
        w.set_correction(A, B=torch.randn(E, r, K, generator=g) / K**0.5)
    return w, b


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("rows", [1, 7])
def test_each_expert_is_its_dequantized_weight_plus_its_correction(shared, rows):
    w, b = _weights(shared=shared)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    R = w.project(x)
    assert (R is None) != shared
    for e in range(w.num_experts):
        B = w.projection.B if shared else w.B[e]
        expected = (x.double() @ w.dequantized_weight(e, torch.float64).T + b[e].double()
                    + (x.double() @ B.double().T) @ w.A[e].double().T)
        torch.testing.assert_close(w.expert(e, x, R).double(), expected, rtol=1e-5, atol=1e-5)
    # an expert with no rows
    assert w.expert(1, x[:0], None if R is None else R[:0]).shape == (0, 40)


def test_what_is_attached_is_checked():
    w, _ = _weights()
    with pytest.raises(ValueError, match="either the shared projection or each expert's own B"):
        w.set_correction(torch.zeros(3, 40, 5))
    with pytest.raises(ValueError, match=r"A must be floating point \(3, 40, 5\)"):
        w.set_correction(torch.zeros(3, 41, 5), B=torch.zeros(3, 5, 64))
    with pytest.raises(ValueError, match=r"B must be floating point \(3, 5, 64\)"):
        w.set_correction(torch.zeros(3, 40, 5), B=torch.zeros(3, 5, 63))
    with pytest.raises(ValueError, match="same shape"):
        QuantizedExpertWeights([pack(quantize_rtn(torch.randn(8, 64), 32)), pack(quantize_rtn(torch.randn(9, 64), 32))])
    w.set_correction(None)
    assert w.rank == 0 and w.A is None and w.projection is None


@pytest.mark.parametrize("shared", [True, False])
def test_keeping_some_experts_corrections_equals_zeroing_the_others(shared):
    """GlowQ-S per expert: ``keep_experts`` stores the kept experts' factors only, and every path
    (one expert, the sorted experts op, the corrected dense weight) equals the full stack with the
    dropped experts' ``A_e`` set to zero; the kept rows are the original ones, bit for bit."""
    from glowq_fx.capture.experts import TracedWeight
    from glowq_fx.modules.experts import QuantizedWeightsView

    w, _ = _weights(E=4, shared=shared, seed=3)
    zeroed, _ = _weights(E=4, shared=shared, seed=3)
    keep = torch.tensor([True, False, True, False])
    A_full, B_full = w.A.clone(), None if w.B is None else w.B.clone()
    w.keep_experts(keep)
    zeroed.A[~keep] = 0
    assert w.A.shape[0] == 2 and torch.equal(w.A, A_full[keep])
    assert torch.equal(w.factor_slots, torch.tensor([0, -1, 1, -1], dtype=torch.int32))
    if not shared:
        assert torch.equal(w.B, B_full[keep])
    assert torch.equal(w.corrected_experts, keep) and "corrected_experts=2" in repr(w)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(11, 64, generator=g)
    offsets = torch.tensor([3, 5, 9, 11])
    got = w.experts(x, offsets, w.project(x))
    want = zeroed.experts(x, offsets, zeroed.project(x))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for e in range(4):
        torch.testing.assert_close(w.expert(e, x, w.project(x)), zeroed.expert(e, x, zeroed.project(x)),
                                   rtol=1e-6, atol=1e-6)
    view = QuantizedWeightsView(w, TracedWeight("w", True, True), torch.float32)
    zeroed_view = QuantizedWeightsView(zeroed, TracedWeight("w", True, True), torch.float32)
    for e in range(4):
        torch.testing.assert_close(view.dense(e), zeroed_view.dense(e), rtol=1e-6, atol=1e-6)
    w.keep_experts(torch.tensor([True, False, False, False]))  # a subset of the kept ones again
    assert w.A.shape[0] == 1 and torch.equal(w.A[0], A_full[0])
    with pytest.raises(ValueError, match="within those corrected now"):
        w.keep_experts(torch.tensor([False, True, False, False]))
    with pytest.raises(ValueError, match="corrects no expert"):
        w.set_correction(A_full[:0], projection=w.projection, B=None if shared else B_full[:0],
                         experts=torch.zeros(4, dtype=torch.bool))
    w.keep_experts(torch.zeros(4, dtype=torch.bool))
    assert w.A is None and w.factor_slots is None and w.projection is None


def test_the_protocol_is_read_from_the_marks_not_the_class():
    class Experts(torch.nn.Module):
        has_gate, has_bias, is_transposed = True, False, True

        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 16, 12))  # (E, in, out): transposed
            self.down_proj = torch.nn.Parameter(torch.zeros(4, 6, 16))

    p = experts_protocol(Experts())
    assert (p.first, p.second, p.num_experts, p.is_transposed) == ("gate_up_proj", "down_proj", 4, True)
    Experts.has_gate = False
    assert "no 3-D parameter up_proj" in experts_protocol(Experts())
    assert "lacks transformers' experts marks" in experts_protocol(torch.nn.Linear(2, 2))
