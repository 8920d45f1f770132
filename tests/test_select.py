"""GlowQ-S selection: Kneedle on curves with known knees, ranking and the three policies."""
import math
import random

import pytest

from glowq_fx.select import choose_groups, find_knee, ranking


@pytest.mark.parametrize("corner", [3, 7, 12])
def test_piecewise_linear_knee_is_the_corner(corner):
    # steep rise to the corner, then a gentle slope: the corner is the knee, whatever the scale
    scale = random.uniform(0.1, 1000)
    x = list(range(20))
    y = [scale * (10 * i if i <= corner else 10 * corner + 0.5 * (i - corner)) for i in x]
    assert find_knee(x, y, "concave") == corner
    # the same shape mirrored: a steep drop that flattens (perplexity against groups restored)
    assert find_knee(x, [-v for v in y], "convex") == corner


def test_knee_of_smooth_curves_matches_kneed():
    kneed = pytest.importorskip("kneed")
    x = [i / 10 for i in range(1, 101)]
    for y, curve, direction in [([math.log(v) for v in x], "concave", "increasing"),
                                ([1 / v for v in x], "convex", "decreasing"),
                                ([1 - math.exp(-v) for v in x], "concave", "increasing")]:
        expected = kneed.KneeLocator(x, y, curve=curve, direction=direction).knee
        assert x[find_knee(x, y, curve)] == pytest.approx(expected)


def test_lines_have_no_knee_and_bad_input_is_named():
    assert find_knee([0, 1, 2, 3], [0, 2, 4, 6]) is None
    assert find_knee([0, 1, 2], [5, 5, 5]) is None
    assert find_knee([0, 1], [0, 1]) is None
    with pytest.raises(ValueError, match="strictly increasing"):
        find_knee([0, 2, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="one length"):
        find_knee([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="curve must be"):
        find_knee([0, 1, 2], [0, 1, 2], "wavy")


def test_ranking_is_by_score_per_byte():
    assert ranking([10, 10, 1], [1, 2, 1]) == [0, 1, 2]
    assert ranking([1, 8, 3], [1, 2, 1]) == [1, 2, 0]  # 4 and 3 per byte before 1
    with pytest.raises(ValueError, match="positive"):
        ranking([1], [0])


def test_policies():
    rng = random.Random()
    n = 40
    costs = [rng.choice([100, 300]) for _ in range(n)]
    # a few groups carry most of the benefit (as measured on real models: deep layers, MLP inputs)
    scores = [c * (50.0 if i < 6 else 1.0) * rng.uniform(0.9, 1.1) for i, c in enumerate(costs)]
    assert sorted(choose_groups(scores, costs, 6 / n)) == list(range(6))  # the dense six rank first
    half = choose_groups(scores, costs, 0.5)
    assert len(half) == 20 and half == ranking(scores, costs)[:20]
    budget = 2000
    kept = choose_groups(scores, costs, budget)
    assert sum(costs[i] for i in kept) <= budget
    assert all(costs[i] + sum(costs[j] for j in kept) > budget for i in set(range(n)) - set(kept))
    assert choose_groups(scores, costs, 1.0) == ranking(scores, costs)
    for bad in (0.0, 1.5, -3, "most", True, "auto"):
        with pytest.raises(ValueError):
            choose_groups(scores, costs, bad)


# --- GlowQConfig(selective=...) in quantize_ --------------------------------------------------------

import copy  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
import transformers as T  # noqa: E402

from glowq_fx import GlowQConfig, calibrate, quantize_  # noqa: E402
from glowq_fx.modules.linear import QuantizedLinear, SharedProjection  # noqa: E402
from glowq_fx.quantize import AUTO_CURVE_POINTS, curve_batches  # noqa: E402
from glowq_fx.selective import calibration_loss  # noqa: E402
from tests_helpers import tiny_llama_config  # noqa: E402


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(tiny_llama_config(hidden_size=96, intermediate_size=160, num_hidden_layers=3)).eval()
    batches = [{"input_ids": torch.randint(0, 128, (2, 32))} for _ in range(2)]
    return model, calibrate(model, batches, GlowQConfig(group_size=32), progress=False)


def _quantize(calibrated, **kw):
    model, cal = calibrated
    subject = copy.deepcopy(model)
    report = quantize_(subject, cal, GlowQConfig(group_size=32, rank=8, **kw), progress=False)
    return subject, report


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
    full, full_report = _quantize(calibrated)
    sel, report = _quantize(calibrated, selective=policy)
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
    full, _ = _quantize(calibrated)
    rtn, _ = _quantize(calibrated, method="none")
    sel, report = _quantize(calibrated, selective="auto")
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
    full, _ = _quantize(calibrated)
    sel, report = _quantize(calibrated, selective=1.0)
    assert all(g.restored for g in report.groups)
    a, b = full.state_dict(), sel.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad,match", [(dict(selective=1.5), "fraction in"), (dict(selective="most"), "selective must"),
                                       (dict(selective=True), "selective must"),
                                       (dict(selective="auto", method="none"), "has none")])
def test_selective_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        GlowQConfig(**bad)


def test_set_correction_checks_shapes(calibrated):
    model, _ = _quantize(calibrated)
    linear = next(m for m in model.modules() if isinstance(m, QuantizedLinear) and m.A is not None)
    with pytest.raises(ValueError, match="both A and its projection"):
        linear.set_correction(linear.A, None)
    with pytest.raises(ValueError, match="to match the projection"):
        linear.set_correction(linear.A[:, :-1], linear.projection)
