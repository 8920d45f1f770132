import pytest
import torch

from glowq_fx import GlowQConfig, quantize_
from glowq_fx.quant import quantize_clipped, quantize_rtn
from tests_helpers import tiny_llama, token_batches, weighted_group_error


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_no_group_rounds_worse_than_rtn_and_heavy_tails_round_better(group_size, symmetric, gen):
    """alpha = 1 is RTN, so every (row, group) has a weighted error at most RTN's; on weights with
    heavy tails clipping pays, so the total is strictly smaller."""
    K = 200  # a padded last group at 32 and 128
    W = torch.distributions.StudentT(2.5).sample((24, K)) * 0.02
    X = torch.randn(300, K, generator=gen) * torch.rand(K, generator=gen) * 3
    S = X.T @ X / 300
    d = torch.diagonal(S)
    clipped, rtn = quantize_clipped(W, S, group_size, symmetric=symmetric), quantize_rtn(W, group_size,
                                                                                         symmetric=symmetric)
    e_clip, e_rtn = weighted_group_error(W, clipped, d), weighted_group_error(W, rtn, d)
    assert torch.all(e_clip <= e_rtn * (1 + 1e-6) + 1e-12)
    assert e_clip.sum() < 0.95 * e_rtn.sum()
    assert clipped.codes.max() <= 15 and clipped.codes.dtype == torch.uint8
    if not symmetric:  # the zero point stays an integer code, and the padded columns dequantize to 0
        assert torch.equal(clipped.zeros, clipped.zeros.round())
    assert torch.all(clipped.dequantize()[:, K:] == 0) if clipped.dequantize().shape[1] > K else True


def test_without_S_every_column_weighs_the_same(gen):
    W = torch.randn(8, 64, generator=gen)
    assert torch.equal(quantize_clipped(W, None, 32).codes, quantize_clipped(W, torch.eye(64), 32).codes)


def test_bad_arguments_are_named(gen):
    W = torch.randn(4, 64, generator=gen)
    with pytest.raises(ValueError, match=r"S must be \(64, 64\)"):
        quantize_clipped(W, torch.eye(32), 32)
    with pytest.raises(ValueError, match="narrowest"):
        quantize_clipped(W, None, 32, narrowest=0)


def test_the_clip_quantizer_is_registered_and_runs_under_quantize():
    """quantizer="clip" through quantize_: the report says so, and some groups took a clipped grid
    (their codes differ from RTN's)."""
    import copy

    from glowq_fx.modules.linear import QuantizedLinear

    model, batches = tiny_llama(), token_batches(2)
    qweights = {}
    for quantizer in ("rtn", "clip"):
        m = copy.deepcopy(model)
        report = quantize_(m, batches, GlowQConfig(group_size=32, method="none", quantizer=quantizer,
                                                   output_head_bits=None), progress=False)
        assert report.config.quantizer == quantizer
        qweights[quantizer] = {n: mod.qweight for n, mod in m.named_modules() if isinstance(mod, QuantizedLinear)}
    assert qweights["rtn"].keys() == qweights["clip"].keys()
    assert any(not torch.equal(qweights["rtn"][n], qweights["clip"][n]) for n in qweights["rtn"])
