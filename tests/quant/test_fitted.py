import copy

import pytest
import torch

from glowq_fx import GlowQConfig, quantize_
from glowq_fx.quant import quantization_error, quantize_clipped, quantize_fitted, quantize_rtn
from glowq_fx.quant.fitted import ZERO_STEPS
from tests_helpers import tiny_llama, token_batches, weighted_group_error


def _activations(K, gen):
    X = torch.randn(300, K, generator=gen) * torch.rand(K, generator=gen) * 3
    return X.T @ X / 300


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_no_group_rounds_worse_than_its_clipped_grid(group_size, symmetric, gen):
    """The clipped grid is where the fit starts and a round is kept only where it lowers a group's
    weighted error: every (row, group) ends at most at the clipped grid's error, and the total is
    lower: by 3% or more with the fractional zero point, less with the fitted scale alone (symmetric)."""
    K = 200  # a padded last group at 32 and 128
    W = torch.distributions.StudentT(4.0).sample((24, K)) * 0.02
    S = _activations(K, gen)
    d = torch.diagonal(S)
    fitted, clipped = quantize_fitted(W, S, group_size, symmetric=symmetric), quantize_clipped(W, S, group_size,
                                                                                               symmetric=symmetric)
    e_fit, e_clip = weighted_group_error(W, fitted, d), weighted_group_error(W, clipped, d)
    assert torch.all(e_fit <= e_clip * (1 + 1e-6) + 1e-12)
    assert e_fit.sum() < (1.0 if symmetric else 0.97) * e_clip.sum()
    assert fitted.codes.dtype == torch.uint8 and fitted.codes.max() <= 15
    if symmetric:
        assert torch.all(fitted.zeros == 8)


def test_zero_points_lie_on_the_sixteenth_grid_every_16_bit_float_holds(gen):
    W = torch.randn(64, 256, generator=gen) * 0.05
    qw = quantize_fitted(W, _activations(256, gen), 64)
    z = qw.zeros.float()
    assert torch.equal(z * ZERO_STEPS, (z * ZERO_STEPS).round())
    assert torch.all((z >= 0) & (z <= 15))
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(z.to(dtype).float(), z)
    assert not torch.equal(z, z.round()), "no fractional zero point was chosen on random weights"


def test_a_min_max_grid_with_a_fractional_zero_is_found(gen):
    """Weights that are themselves ``(q - z) s`` with ``z`` on the 1/16 grid and every group using
    codes 0 and 15 (a Q4_1-style grid): the fit finds them again up to float32 rounding; RTN's
    integer zero point cannot (it misses by a good fraction of a step)."""
    N, K, g = 16, 256, 64
    n = K // g
    s = torch.rand(N, n, generator=gen) * 0.01 + 0.002
    z = torch.randint(16, 225, (N, n), generator=gen).float() / ZERO_STEPS
    q = torch.randint(0, 16, (N, n, g), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    W = ((q - z.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(N, K)
    assert quantization_error(W, quantize_fitted(W, None, g)).abs().max() < 1e-5 * float(s.min())
    assert quantization_error(W, quantize_rtn(W, g)).abs().max() > 0.1 * float(s.min())


def test_bad_arguments_are_named(gen):
    W = torch.randn(4, 64, generator=gen)
    with pytest.raises(ValueError, match=r"S must be \(64, 64\)"):
        quantize_fitted(W, torch.eye(32), 32)
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        quantize_fitted(W, None, 32, rounds=-1)


def test_the_fitted_quantizer_runs_under_quantize_and_through_the_cpu_kernel():
    """quantizer="fitted" through quantize_: fractional zero points reach the packed model, and the
    CPU int4 kernel (which folds ``s z`` into its parameters) gives the reference path's output."""
    from glowq_fx import use_cpu_kernels
    from glowq_fx.modules.linear import QuantizedLinear

    model, batches = tiny_llama(), token_batches(2)
    report = quantize_(model, batches, GlowQConfig(group_size=32, rank=4, quantizer="fitted",
                                                   output_head_bits=None), progress=False)
    assert report.config.quantizer == "fitted"
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    # stored as 16 * zero: fractional zero points are the ones not divisible by 16
    assert any(m.zeros.dtype == torch.uint8 and bool((m.zeros % 16).any()) for m in linears)
    ids = batches[0]["input_ids"][:1, :1]  # one decode row: the kernel's path
    reference = copy.deepcopy(model)
    use_cpu_kernels(reference, enable=False)
    if not any(m.int4pack is not None for m in model.modules() if isinstance(m, QuantizedLinear)):
        pytest.skip("no CPU int4 kernel on this machine")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=2e-2, atol=2e-2)
