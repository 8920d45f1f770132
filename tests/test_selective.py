"""GlowQ-S on a live model: switching corrections in place, the three scores, the top-k sweep."""
import copy

import pytest
import torch
import transformers as T

from glowq_fx import GlowQConfig, calibrate, quantize_
from glowq_fx.evaluate import perplexity
from glowq_fx.selective import (Corrections, SweepPoint, calibration_loss, order_by, sweep, sweep_elbow,
                                unit_scores)
from tests_helpers import tiny_llama_config


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(tiny_llama_config(hidden_size=96, intermediate_size=160, num_hidden_layers=2)).eval()
    batches = [{"input_ids": torch.randint(0, 128, (2, 32))} for _ in range(2)]
    cal = calibrate(model, batches, GlowQConfig(group_size=32), progress=False)
    return model, cal, batches


def _quantized(setup, **kw):
    model, cal, _ = setup
    subject = copy.deepcopy(model)
    report = quantize_(subject, cal, GlowQConfig(group_size=32, rank=8, **kw), progress=False)
    return subject, report


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_switching_everything_off_is_rtn_and_back_on_is_glowq(setup):
    glowq, report = _quantized(setup)
    rtn, _ = _quantized(setup, method="none")
    ids = torch.randint(0, 128, (2, 16))
    full = _logits(glowq, ids)
    corrections = Corrections(glowq)
    assert sorted(corrections.names) == sorted(g.name for g in report.groups)
    corrections.set([])
    assert torch.equal(_logits(glowq, ids), _logits(rtn, ids))
    corrections.set(corrections.names)
    assert torch.equal(_logits(glowq, ids), full)
    with pytest.raises(ValueError, match="unknown correction units"):
        corrections.set(["model.layers.9.mlp.down_proj"])
    with pytest.raises(ValueError, match="no low-rank corrections"):
        Corrections(rtn)


@pytest.mark.parametrize("method", ["glowq", "qera"])
def test_gain_scores_add_up_to_the_report(setup, method):
    model, report = _quantized(setup, method=method)
    corrections = Corrections(model)
    scores = unit_scores(corrections, report, "gain")
    assert sum(scores.values()) == pytest.approx(sum(g.restore_gain for g in report.groups), rel=1e-9)
    if method == "qera":  # one unit per linear
        assert len(scores) == sum(len(g.members) for g in report.groups)
    weight = unit_scores(corrections, report, "weight_error")
    assert all(0 < v < 1 for v in weight.values())


def test_measured_score_is_the_loss_increase_of_switching_one_unit_off(setup):
    model, report = _quantized(setup)
    _, _, batches = setup
    corrections = Corrections(model)
    ids = torch.randint(0, 128, (1, 12))
    before = _logits(model, ids)
    scores = unit_scores(corrections, report, "measured", model=model, batches=batches, progress=False)
    name = corrections.names[1]
    base = calibration_loss(model, batches)
    corrections.set(set(corrections.names) - {name})
    assert scores[name] == pytest.approx(calibration_loss(model, batches) - base, rel=1e-9, abs=1e-12)
    corrections.set(corrections.names)
    assert torch.equal(_logits(model, ids), before)  # the scoring left every correction on
    with pytest.raises(ValueError, match="needs the model"):
        unit_scores(corrections, report, "measured")


def test_sweep_ends_are_rtn_and_full_glowq(setup):
    model, report = _quantized(setup)
    rtn, _ = _quantized(setup, method="none")
    corrections = Corrections(model)
    tokens = torch.randint(0, 128, (200,))
    order = order_by(unit_scores(corrections, report), corrections)
    n = len(order)
    points = sweep(model, corrections, order, tokens, [0, 2, n], seq_len=64, progress=False)
    assert [p.k for p in points] == [0, 2, n]
    assert points[0].perplexity == perplexity(rtn, tokens, 64, progress=False).perplexity
    assert points[-1].perplexity == perplexity(model, tokens, 64, progress=False).perplexity
    assert points[0].factor_bytes == 0 < points[1].factor_bytes < points[2].factor_bytes
    assert points[2].factor_bytes == report.total("factor_bytes")
    assert corrections.enabled == set(corrections.names)
    with pytest.raises(ValueError, match="outside"):
        sweep(model, corrections, order, tokens, [n + 1], seq_len=64, progress=False)


def test_sweep_elbow_on_a_known_corner():
    pts = [SweepPoint(k, 100 * k, 30.0 - (2.0 * k if k <= 4 else 8 + 0.1 * (k - 4))) for k in range(12)]
    assert sweep_elbow(pts).k == 4
    assert sweep_elbow(pts[:2]) is None
