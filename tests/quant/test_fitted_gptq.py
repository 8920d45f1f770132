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
    # stored as 16 * zero: fractional zero points are the ones not divisible by 16
    assert linears and any(m.zeros.dtype == torch.uint8 and bool((m.zeros % 16).any()) for m in linears)
    with torch.no_grad():
        logits = model(**batches[0]).logits
    assert torch.isfinite(logits).all()
    rel = (logits - float_logits).norm() / float_logits.norm()
    assert rel < 0.2, f"relative error {rel:.3f} of the quantized logits"


def test_alternation_never_raises_a_groups_whitened_error_and_lowers_some():
    """alternations=2 (LoftQ's alternation) under quantize_: no group ends with a larger whitened
    error after correction than without alternation (a round is kept only where it lowers it), some
    group's is lower, and the model's output stays near the float model's."""
    batches = token_batches(2)
    reports = {}
    for rounds in (0, 2):
        model = tiny_llama()
        reports[rounds] = quantize_(model, batches, GlowQConfig(group_size=32, rank=4, quantizer="fitted-gptq",
                                                                alternations=rounds, output_head_bits=None),
                                    progress=False)
    plain = {g.name: g.error_after for g in reports[0].groups}
    alternated = {g.name: g.error_after for g in reports[2].groups}
    assert plain.keys() == alternated.keys()
    assert all(alternated[k] <= plain[k] * (1 + 1e-6) for k in plain)
    assert any(alternated[k] < plain[k] * 0.999 for k in plain)


@pytest.mark.parametrize("kwargs, message", [({"alternations": -1}, "alternations must be a non-negative int"),
                                             ({"alternations": 1, "rank": 0}, "rank=0 has none")])
def test_bad_alternations_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GlowQConfig(**kwargs)


def test_alternation_refuses_experts():
    import transformers as T

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        moe = T.MixtralForCausalLM(T.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                   num_local_experts=4, num_experts_per_tok=2)).eval()
    with pytest.raises(ValueError, match=r"alternations=1 is for dense groups.*set alternations=0"):
        quantize_(moe, token_batches(1), GlowQConfig(rank=4, group_size=32, alternations=1), progress=False)


@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_full_shrink_is_the_fitted_quantizer_and_no_shrink_is_unchanged(group_size, gen):
    """``shrink=1`` leaves GPTQ only ``diag(S)``: no error to feed forward, so its codes and grids
    are the fitted quantizer's exactly on a correlated ``S``; ``shrink=0`` is GPTQ unchanged (and
    below ``shrink=1`` in ``tr(E S E^T)``); ``shrink=0.5`` gives codes of its own."""
    W = torch.randn(24, 128, generator=gen) * 0.03
    S = anisotropic_second_moment(128, gen).float()
    full, fitted = quantize_fitted_gptq(W, S, group_size, shrink=1.0), quantize_fitted(W, S, group_size)
    assert torch.equal(full.codes, fitted.codes)
    assert torch.equal(full.scales, fitted.scales) and torch.equal(full.zeros, fitted.zeros)
    none, plain = quantize_fitted_gptq(W, S, group_size, shrink=0.0), quantize_fitted_gptq(W, S, group_size)
    assert torch.equal(none.codes, plain.codes) and torch.equal(none.zeros, plain.zeros)
    half = quantize_fitted_gptq(W, S, group_size, shrink=0.5)
    assert not torch.equal(half.codes, none.codes) and not torch.equal(half.codes, full.codes)
    assert _objective(W, none, S) < _objective(W, full, S)


def test_shrink_goes_through_the_config_and_is_checked():
    from glowq_fx.config import QuantizationConfig
    from glowq_fx.registry import QUANTIZERS

    gen = torch.Generator().manual_seed(3)
    W, S = torch.randn(8, 64, generator=gen), anisotropic_second_moment(64, gen).float()
    config = QuantizationConfig(group_size=32, quantizer="fitted-gptq", gptq_shrink=1.0)
    assert torch.equal(QUANTIZERS["fitted-gptq"](W, S, config).codes, quantize_fitted(W, S, 32).codes)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="gptq_shrink must lie in"):
            QuantizationConfig(gptq_shrink=bad)
        with pytest.raises(ValueError, match="shrink must lie in"):
            quantize_fitted_gptq(W, S, 32, shrink=bad)
