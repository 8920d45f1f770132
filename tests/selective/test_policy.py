"""selective.policy: GlowQConfig(selective=...) in quantize_ keeps exactly the chosen corrections."""
import copy
import json

import pytest
import torch
import transformers as T

from glowq_fx import GlowQConfig, calibrate, quantize_
from glowq_fx.modules.linear import SharedProjection
from glowq_fx.selective.corrections import calibration_loss
from glowq_fx.selective.knee import choose_groups, find_knee
from glowq_fx.selective.policy import AUTO_CURVE_POINTS, curve_batches
from tests_helpers import quantized_copy, tiny_llama_config


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(tiny_llama_config(hidden_size=96, intermediate_size=160, num_hidden_layers=3)).eval()
    batches = [{"input_ids": torch.randint(0, 128, (2, 32))} for _ in range(2)]
    return model, calibrate(model, batches, GlowQConfig(group_size=32), progress=False)


def _auto_expected(full_report, report):
    """What selective="auto" must keep: the best groups (by removed error per byte) up to the knee
    of the loss curve it measured."""
    curve = report.selection["curve"]
    knee = find_knee([p["factor_bytes"] for p in curve], [p["loss"] for p in curve], "convex")
    ranked = choose_groups([g.restore_gain for g in full_report.groups],
                           [g.candidate_factor_bytes for g in full_report.groups], 1.0)
    k = len(ranked) if knee is None else curve[knee]["k"]
    assert report.selection["kept"] == k
    return ranked[:k]


@pytest.mark.parametrize("policy", ["auto", 0.5, 30000])
def test_selective_model_equals_full_glowq_with_the_other_corrections_removed(calibrated, policy):
    full, full_report = quantized_copy(calibrated)
    sel, report = quantized_copy(calibrated, selective=policy)
    kept = [g for g in report.groups if g.restored]
    assert 0 < len(kept) < len(report.groups)
    # the choice is the documented one: ranking by removed whitened error per factor byte
    expected = (_auto_expected(full_report, report) if policy == "auto" else
                choose_groups([g.restore_gain for g in full_report.groups],
                              [g.candidate_factor_bytes for g in full_report.groups], policy))
    assert {g.name for g in kept} == {full_report.groups[i].name for i in expected}
    # the unchosen projections are not in the module tree (nor in a saved state_dict)
    assert sum(isinstance(m, SharedProjection) for m in sel.modules()) == len(kept)
    if isinstance(policy, float):
        assert len(kept) == -(-len(report.groups) * policy // 1)
    if isinstance(policy, int) and not isinstance(policy, bool):
        assert report.total("factor_bytes") <= policy
    modules = dict(full.named_modules())
    for g in report.groups:
        for name in g.members:
            assert (dict(sel.named_modules())[name].A is not None) == g.restored
            if not g.restored:
                modules[name].set_correction(None, None)
        assert g.factor_bytes == (g.candidate_factor_bytes if g.restored else 0)
        assert g.error_after == pytest.approx(g.error_before) if not g.restored else g.error_after < g.error_before
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert torch.equal(sel(input_ids=ids).logits, full(input_ids=ids).logits)
    assert "GlowQ-S" in str(report)


def test_auto_loss_curve_is_measured_on_the_model(calibrated):
    _, cal = calibrated
    # the curve is measured before the output head is quantized: compared with float-head models
    full, _ = quantized_copy(calibrated, output_head_bits=None)
    rtn, _ = quantized_copy(calibrated, method="none", output_head_bits=None)
    sel, report = quantized_copy(calibrated, selective="auto", output_head_bits=None)
    curve = report.selection["curve"]
    batches = curve_batches(cal.batches)
    assert report.selection["curve_tokens"] == sum(b["input_ids"].numel() for b in batches)
    n = len(report.groups)
    assert [p["k"] for p in curve] == sorted(set(range(0, n, -(-n // AUTO_CURVE_POINTS))) | {n})
    assert curve[0]["loss"] == calibration_loss(rtn, batches)  # k = 0: RTN, the same arithmetic
    assert curve[-1]["loss"] == calibration_loss(full, batches)  # k = all: full GlowQ
    assert curve[-1]["factor_bytes"] == report.total("candidate_factor_bytes")
    assert "knee of the calibration loss" in str(report)
    assert json.loads(json.dumps(report.to_dict()))["selection"]["kept"] == report.selection["kept"]


def test_curve_batches_cut_rows_to_the_token_budget():
    batches = [{"input_ids": torch.arange(4 * 10).view(4, 10), "attention_mask": torch.ones(4, 10), "labels": None}
               for _ in range(3)]
    cut = curve_batches(batches, max_tokens=55)  # 4 rows of the first (40 tokens), 1 of the second
    assert [b["input_ids"].shape[0] for b in cut] == [4, 1]
    assert torch.equal(cut[1]["attention_mask"], batches[1]["attention_mask"][:1]) and cut[1]["labels"] is None
    assert [b["input_ids"].shape[0] for b in curve_batches(batches, max_tokens=3)] == [1]  # at least one row
    assert sum(b["input_ids"].numel() for b in curve_batches(batches, max_tokens=10**6)) == 120


def test_auto_needs_a_causal_lm_and_its_batches(calibrated):
    model, cal = calibrated
    bare = copy.copy(cal)
    bare.batches = []
    with pytest.raises(ValueError, match="holds no batches"):
        quantize_(copy.deepcopy(model), bare, GlowQConfig(group_size=32, rank=8, selective="auto"), progress=False)
    tensors = [torch.randint(0, 128, (2, 32))]
    with pytest.raises(ValueError, match="needs batches of the form"):
        quantize_(copy.deepcopy(model), tensors, GlowQConfig(group_size=32, rank=8, selective="auto"),
                  progress=False)


def test_selective_one_keeps_everything(calibrated):
    full, _ = quantized_copy(calibrated)
    sel, report = quantized_copy(calibrated, selective=1.0)
    assert all(g.restored for g in report.groups)
    a, b = full.state_dict(), sel.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad,match", [(dict(selective=1.5), "fraction in"), (dict(selective="most"), "selective must"),
                                       (dict(selective=True), "selective must"),
                                       (dict(selective="auto", method="none"), "has none")])


def test_selective_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        GlowQConfig(**bad)
