import pytest
import torch
from conftest import anisotropic_second_moment

from glowq_fx import GlowQConfig, quantize_
from glowq_fx.quant import quantization_error, quantize_fitted, quantize_fitted_gptq, quantize_gptq
from glowq_fx.quant.fitted import ZERO_STEPS
from tests_helpers import tiny_llama, token_batches


def _objective(W, qw, S):
    E = quantization_error(W, qw).double()
    return float(torch.trace(E @ S.double() @ E.T))


@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_identity_S_reduces_to_the_fitted_quantizer(group_size, gen):
    """Uncorrelated inputs leave GPTQ no error to propagate: its codes and grids are the fitted
    quantizer's exactly (the grid fitted on the untouched weights, nearest codes on it)."""
    W = torch.randn(16, 128, generator=gen) * 0.03
    S = torch.eye(128)
    ours, fitted = quantize_fitted_gptq(W, S, group_size, damp=0.0), quantize_fitted(W, S, group_size)
    assert torch.equal(ours.codes, fitted.codes)
    assert torch.equal(ours.scales, fitted.scales) and torch.equal(ours.zeros, fitted.zeros)


@pytest.mark.parametrize("group_size, K", [(64, 256), (32, 200), (128, 576), (-1, 96)])
@pytest.mark.parametrize("act_order", [False, True])
def test_objective_below_gptq_and_below_the_fitted_grid_alone(group_size, K, act_order):
    """On correlated inputs (fresh seeds) the fitted grid under GPTQ's error feedback lowers
    ``tr(E S E^T)`` below GPTQ on min/max grids and below the fitted grid with nearest rounding."""
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        W = torch.distributions.StudentT(4.0).sample((48, K)).mul(0.02).to(torch.bfloat16)
        S = anisotropic_second_moment(K, gen).float()
        ours = quantize_fitted_gptq(W, S, group_size, act_order=act_order)
        gptq = quantize_gptq(W, S, group_size, act_order=act_order)
        fitted = quantize_fitted(W, S, group_size)
        assert _objective(W, ours, S) < _objective(W, gptq, S)
        assert _objective(W, ours, S) < _objective(W, fitted, S)
        assert ours.codes.dtype == torch.uint8 and int(ours.codes.max()) <= 15
        z = ours.zeros.float()
        assert torch.equal(z * ZERO_STEPS, (z * ZERO_STEPS).round()) and torch.all((z >= 0) & (z <= 15))
        # padded columns: an integer code, the last group's zero point rounded
        pad = ours.codes[:, K:].float()
        assert torch.equal(pad, ours.zeros[:, -1:].float().round().expand_as(pad))


def test_the_fitted_gptq_quantizer_runs_under_quantize():
    """quantizer="fitted-gptq" through quantize_: the model's quantized linears hold fractional zero
    points and its output stays near the float model's (a GPTQ on fitted grids, not garbage)."""
    from glowq_fx.modules.linear import QuantizedLinear

    model, batches = tiny_llama(), token_batches(2)
    reference = tiny_llama()
    with torch.no_grad():
        float_logits = reference(**batches[0]).logits
    report = quantize_(model, batches, GlowQConfig(group_size=32, rank=0, quantizer="fitted-gptq",
                                                   output_head_bits=None), progress=False)
    assert report.config.quantizer == "fitted-gptq"
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert linears and any(not torch.equal(m.zeros, m.zeros.round()) for m in linears)
    with torch.no_grad():
        logits = model(**batches[0]).logits
    assert torch.isfinite(logits).all()
    rel = (logits - float_logits).norm() / float_logits.norm()
    assert rel < 0.2, f"relative error {rel:.3f} of the quantized logits"
