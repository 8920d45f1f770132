"""One calibration for many methods: calibrate + quantize_ reuse, factor bytes, the comparison rows."""
import copy

import pytest
import torch
import transformers as T

from glowq_fx import GlowQConfig, calibrate, quantize_
from glowq_fx.studies.accuracy import (
    Method,
    compare_methods,
    equal_memory_rank,
    factor_bytes,
    plot_perplexity_vs_bytes,
)
from tests_helpers import tiny_llama_config


def _model():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(tiny_llama_config(hidden_size=96, intermediate_size=160)).eval()


def _batches():
    return [{"input_ids": torch.randint(0, 128, (2, 32))} for _ in range(2)]


@pytest.fixture(scope="module")
def calibrated_model():
    model = _model()
    return model, calibrate(model, _batches(), GlowQConfig(group_size=32), progress=False)


@pytest.mark.parametrize("method", ["glowq", "qera", "none"])
def test_reused_calibration_equals_a_direct_quantize(method):
    model, batches = _model(), _batches()
    config = GlowQConfig(group_size=32, rank=8, method=method)
    direct = copy.deepcopy(model)
    quantize_(direct, batches, config, progress=False)
    calibrated = calibrate(model, batches, config, progress=False)
    for _ in range(2):  # the Calibration is not consumed
        reused = copy.deepcopy(model)
        quantize_(reused, calibrated, config, progress=False)
        a, b = direct.state_dict(), reused.state_dict()
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_calibration_of_other_weights_is_refused(calibrated_model):
    _, calibrated = calibrated_model
    other = _model()
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp.*weights differ"):
        quantize_(other, calibrated, GlowQConfig(group_size=32), progress=False)
    with pytest.raises(ValueError, match="pass groups to calibrate"):
        quantize_(_model(), calibrated, GlowQConfig(group_size=32), groups=calibrated.groups, progress=False)


@pytest.mark.parametrize("method,rank", [("glowq", 8), ("qera", 8), ("glowq", 40), ("qera", 40), ("none", 8)])
def test_factor_bytes_match_what_quantize_stores(calibrated_model, method, rank):
    model, calibrated = calibrated_model
    subject = copy.deepcopy(model)
    report = quantize_(subject, calibrated, GlowQConfig(group_size=32, rank=rank, method=method), progress=False)
    # a float32 model stores its factors in bfloat16 by default (GlowQConfig.factor_dtype="auto")
    assert subject.model.embed_tokens.weight.dtype == torch.float32
    assert factor_bytes(calibrated.groups, method, rank) == report.total("factor_bytes")


def test_equal_memory_rank_is_the_largest_that_fits(calibrated_model):
    _, calibrated = calibrated_model
    groups = calibrated.groups
    budget = factor_bytes(groups, "qera", 16)
    r = equal_memory_rank(groups, budget)
    assert factor_bytes(groups, "glowq", r) <= budget < factor_bytes(groups, "glowq", r + 1)
    assert r > 16  # shared B: more rank for the same bytes, since groups have several members


def test_compare_methods_rows(calibrated_model, tmp_path):
    model, calibrated = calibrated_model
    tokens = torch.randint(0, 128, (300,))
    seen = []
    methods = [Method("ref", None), Method("rtn", GlowQConfig(group_size=32, method="none")),
               Method("glowq", GlowQConfig(group_size=32, rank=8))]
    rows = compare_methods(model, tokens, calibrated, methods, seq_len=64, progress=False,
                           on_model=lambda spec, m: seen.append((spec.label, m)))
    assert [r.label for r in rows] == ["ref", "rtn", "glowq"]
    assert rows[0].gap_closed == pytest.approx(100) and rows[1].gap_closed == pytest.approx(0)
    ref, rtn, glowq = (r.perplexity for r in rows)
    assert rows[2].gap_closed == pytest.approx(100 * (rtn - glowq) / (rtn - ref))
    assert [label for label, _ in seen] == ["rtn", "glowq"] and seen[1][1] is not model
    assert not any(type(m).__name__ == "QuantizedLinear" for m in model.modules())  # the original is untouched
    plot_perplexity_vs_bytes(rows, tmp_path / "p.png", "test")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
