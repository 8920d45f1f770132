import pytest
import torch
from conftest import anisotropic_second_moment

from glowq_fx.quant import quantization_error, quantize_gptq, quantize_rtn


def _objective(W, qw, S):
    E = quantization_error(W, qw).double()
    return float(torch.trace(E @ S.double() @ E.T))


@pytest.mark.parametrize("group_size, K", [(64, 256), (32, 200), (-1, 96), (128, 576)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_objective_below_rtn(group_size, K, act_order, symmetric):
    gen = torch.Generator().manual_seed(1234)
    W = torch.randn(48, K, generator=gen).to(torch.float16)
    S = anisotropic_second_moment(K, gen).float()
    q_rtn = quantize_rtn(W, group_size, symmetric=symmetric)
    q_gptq = quantize_gptq(W, S, group_size, symmetric=symmetric, act_order=act_order)
    assert q_gptq.codes.shape == q_rtn.codes.shape and q_gptq.scales.shape == q_rtn.scales.shape
    assert int(q_gptq.codes.max()) <= 15
    assert _objective(W, q_gptq, S) < 0.9 * _objective(W, q_rtn, S)
    # padded columns follow RTN's layout: the zero point of the last group
    pad = q_gptq.codes[:, K:].float()
    assert torch.equal(pad, q_gptq.zeros[:, -1:].float().expand_as(pad))


@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_identity_S_reduces_to_rtn(group_size, gen):
    """With uncorrelated inputs GPTQ has no error to propagate: it must equal RTN exactly."""
    W = torch.randn(16, 128, generator=gen)
    q_gptq = quantize_gptq(W, torch.eye(128), group_size, damp=0.0)
    q_rtn = quantize_rtn(W, group_size)
    assert torch.equal(q_gptq.codes, q_rtn.codes)
    assert torch.equal(q_gptq.scales, q_rtn.scales)


def test_dead_inputs_are_tolerated(gen):
    W = torch.randn(8, 64, generator=gen)
    S = anisotropic_second_moment(64, gen).float()
    S[:, 3] = 0
    S[3, :] = 0
    qw = quantize_gptq(W, S, 32)
    assert qw.dequantize()[:, 3].abs().max() == 0


def test_bad_inputs_raise(gen):
    W = torch.randn(8, 64, generator=gen)
    with pytest.raises(ValueError, match=r"S must be \(64, 64\)"):
        quantize_gptq(W, torch.eye(32), 32)
    S = torch.eye(64)
    S[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_gptq(W, S, 32)
    v = torch.randn(64, 1, generator=gen)
    with pytest.raises(ValueError, match="gptq_damp"):
        quantize_gptq(W, v @ v.T, 32, damp=0.0)
    with pytest.raises(ValueError, match="bits=8"):
        quantize_gptq(W, torch.eye(64), 32, bits=8)


@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_full_shrink_reduces_to_rtn_on_a_correlated_S(group_size, gen):
    """``shrink=1`` keeps only ``diag(S)``: the min/max grid does not read it, so GPTQ is RTN."""
    W = torch.randn(16, 128, generator=gen)
    S = anisotropic_second_moment(128, gen).float()
    q_gptq, q_rtn = quantize_gptq(W, S, group_size, shrink=1.0), quantize_rtn(W, group_size)
    assert torch.equal(q_gptq.codes, q_rtn.codes) and torch.equal(q_gptq.scales, q_rtn.scales)
    assert not torch.equal(quantize_gptq(W, S, group_size).codes, q_rtn.codes)
