"""glowq_fx.registry: a method is one registered handler. A toy correction and a toy quantizer,
registered from this file alone, run through quantize_ like the built-in ones."""
import copy

import pytest
import torch

from glowq_fx import GlowQConfig, quantize_
from glowq_fx.correction.method import CorrectionMethod
from glowq_fx.correction.methods.lqer import diagonal_whitening
from glowq_fx.modules import QuantizedLinear, SharedProjection
from glowq_fx.quant import quantize_rtn
from glowq_fx.registry import CORRECTIONS, QUANTIZERS, Registry
from tests_helpers import logits, tiny_llama, token_batches

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def toy_correction():
    """One B per group like GlowQ, but scaled by the channel RMS (LQER's scaling) instead of whitened."""
    method = CorrectionMethod("toy-shared-rms", diagonal_whitening, shared=True, alone="lqer")
    CORRECTIONS.register(method.name, method)
    yield method
    CORRECTIONS.unregister(method.name)


@pytest.fixture
def toy_quantizer():
    """Symmetric round to nearest, whatever the config says."""
    def symmetric_rtn(W, S, config):
        return quantize_rtn(W, config.group_size, bits=config.bits, symmetric=True)

    QUANTIZERS.register("toy-symmetric", symmetric_rtn)
    yield "toy-symmetric"
    QUANTIZERS.unregister("toy-symmetric")


def test_a_registered_correction_runs_through_quantize_(toy_correction):
    model = tiny_llama()
    q = copy.deepcopy(model)
    # full rank, no shrinkage: any shared correction gives back W, so the logits are the float model's
    report = quantize_(q, token_batches(2), GlowQConfig(group_size=32, method=toy_correction.name, rank=10**6,
                                                        shrinkage=0.0, factor_dtype="model", output_head_bits=None),
                       progress=False)
    ref = logits(model, IDS)
    assert (logits(q, IDS) - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))
    # shared: one projection per group, every member of a group pointing at it
    projections = [m for m in q.modules() if isinstance(m, SharedProjection)]
    assert len(projections) == len(report.groups)
    members = {n: m for n, m in q.named_modules() if isinstance(m, QuantizedLinear)}
    for g in report.groups:
        assert len({id(members[n].projection) for n in g.members}) == 1
    assert f"method {toy_correction.name}" in str(report)


def test_a_registered_correction_at_low_rank_differs_from_glowq_and_helps(toy_correction):
    batches, config = token_batches(2), dict(group_size=32, rank=4, output_head_bits=None)
    toy = quantize_(tiny_llama(), batches, GlowQConfig(method=toy_correction.name, **config), progress=False)
    glowq = quantize_(tiny_llama(), batches, GlowQConfig(method="glowq", **config), progress=False)
    assert all(g.error_after < g.error_before for g in toy.groups)
    assert [g.error_after for g in toy.groups] != [g.error_after for g in glowq.groups]
    # GlowQ's whitening is optimal for the whitened objective both report: it is never worse
    assert sum(g.error_after for g in glowq.groups) <= sum(g.error_after for g in toy.groups) * (1 + 1e-3)


def test_a_registered_quantizer_runs_through_quantize_(toy_quantizer):
    config = dict(group_size=32, method="none", output_head_bits=None)
    toy = tiny_llama()
    quantize_(toy, token_batches(2), GlowQConfig(quantizer=toy_quantizer, **config), progress=False)
    symmetric = tiny_llama()
    quantize_(symmetric, token_batches(2), GlowQConfig(symmetric=True, **config), progress=False)
    a, b = toy.state_dict(), symmetric.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_offers_what_is_registered(toy_correction):
    from glowq_fx.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["quantize", "smollm2", "--out", "x", "--method", "not-registered"])
    assert done.value.code == 2
    import argparse

    parser = argparse.ArgumentParser()
    from glowq_fx.cli.main import _quantization_args

    _quantization_args(parser)
    assert parser.parse_args(["--method", toy_correction.name]).method == toy_correction.name


def test_unknown_names_are_refused_with_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown method 'lora': choose one of \['glowq', 'qera', 'lqer', 'svd', "
                                         r"'none'.*register"):
        GlowQConfig(method="lora")
    with pytest.raises(ValueError, match=r"unknown quantizer 'awq': choose one of \['rtn', 'clip', 'fitted', 'gptq'"):
        GlowQConfig(quantizer="awq")


def test_a_taken_name_is_refused_unless_replaced():
    table = Registry("method", "toy")
    first, second = object(), object()
    table.register("a", first)
    table.register("a", first)  # the same handler again: a no-op (a module imported twice)
    with pytest.raises(ValueError, match="'a' is already registered"):
        table.register("a", second)
    table.register("a", second, replace=True)
    assert table["a"] is second and table.names() == ("a",)
    with pytest.raises(ValueError, match="non-empty string"):
        table.register("", first)


def test_a_registered_correction_reaches_the_experts(toy_correction):
    import warnings

    import transformers as T

    from glowq_fx.errors import GlowQWarning

    config = T.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T.MixtralForCausalLM(config).eval()
    q = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GlowQWarning)
        quantize_(q, token_batches(2), GlowQConfig(group_size=32, method=toy_correction.name, rank=64, shrinkage=0.0,
                                                   svd="exact", factor_dtype="model", output_head_bits=None),
                  progress=False)
    experts = q.model.layers[0].mlp.experts
    assert experts.gate_up_proj.projection is not None  # one B across the experts: the method is shared
    assert experts.down_proj.B is not None and experts.down_proj.B.shape[0] == 4  # its `alone` method, per expert
    ref = logits(model, IDS)
    torch.testing.assert_close(logits(q, IDS), ref, rtol=0, atol=2e-5 * ref.abs().max().item())
