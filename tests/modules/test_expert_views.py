"""modules.experts.QuantizedWeightsView (over capture.experts' views): a module's own code reading
quantized 3-D weights through views gets the quantized product with its correction for F.linear / @
on one expert's slice, in either stored orientation, and the corrected dense weight for anything
else."""
import pytest
import torch
import torch.nn.functional as F

from glowq_fx.capture.experts import TracedWeight
from glowq_fx.kernels.layout import pack
from glowq_fx.modules.experts import QuantizedExpertWeights, QuantizedWeightsView
from glowq_fx.modules.linear import SharedProjection
from glowq_fx.quant import quantize_rtn


def _view(stored_out_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = QuantizedExpertWeights([pack(quantize_rtn(torch.randn(24, 64, generator=g), 32)) for _ in range(3)])
    w.set_correction(torch.randn(3, 24, 4, generator=g) / 4,
                     projection=SharedProjection(torch.randn(4, 64, generator=g) / 8, ("e.w",)))
    return w, QuantizedWeightsView(w, TracedWeight("w", True, stored_out_in), torch.float32)


def _effective(w, e):  # deq(W_e) + A_e B, (out, in)
    return w.dequantized_weight(e, torch.float64) + w.A[e].double() @ w.projection.B.double()


@pytest.mark.parametrize("stored_out_in", [True, False])
def test_products_with_one_slice_are_the_corrected_expert(stored_out_in):
    w, view = _view(stored_out_in)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(24, generator=torch.Generator().manual_seed(2))
    for e in range(3):
        expected = x.double() @ _effective(w, e).T
        got = [F.linear(x, view[e]) if stored_out_in else F.linear(x, view[e].T),
               x @ view[e].T if stored_out_in else x @ view[e],
               torch.matmul(x, view[e].t() if stored_out_in else view[e])]
        for y in got:
            torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
        with_bias = F.linear(x, view[e] if stored_out_in else view[e].T, bias)
        torch.testing.assert_close(with_bias.double(), expected + bias.double(), rtol=1e-5, atol=1e-5)


def test_other_uses_get_the_corrected_dense_weight():
    w, view = _view(True)
    assert view.shape == (3, 24, 64) and view[1].shape == (24, 64) and view[1].T.shape == (64, 24) and len(view) == 3
    torch.testing.assert_close(torch.sum(view[1]).double(), _effective(w, 1).sum(), rtol=1e-5, atol=1e-4)
    gathered = view[torch.tensor([2, 0])]  # a tensor index: the dense weights, gathered
    torch.testing.assert_close(gathered.double(), torch.stack([_effective(w, 2), _effective(w, 0)]), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(IndexError):
        view[3]
