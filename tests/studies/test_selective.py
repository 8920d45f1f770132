"""selective.study: the three scores, the top-k sweep, elbows, correction latency, the rank sweep."""
import pytest
import torch

from glowq_fx import GlowQConfig
from glowq_fx.evaluation.perplexity import perplexity
from glowq_fx.selective.corrections import Corrections, calibration_loss
from glowq_fx.studies.selective import (
    SweepPoint,
    correction_latency,
    order_by,
    rank_sweep,
    sweep,
    sweep_elbow,
    unit_scores,
)
from tests_helpers import logits, quantized_copy


@pytest.mark.parametrize("method", ["glowq", "qera"])
def test_gain_scores_add_up_to_the_report(glowq_s_model, method):
    model, report = quantized_copy(glowq_s_model, method=method)
    corrections = Corrections(model)
    scores = unit_scores(corrections, report, "gain")
    assert sum(scores.values()) == pytest.approx(sum(g.restore_gain for g in report.groups), rel=1e-9)
    if method == "qera":  # one unit per linear
        assert len(scores) == sum(len(g.members) for g in report.groups)
    weight = unit_scores(corrections, report, "weight_error")
    assert all(0 < v < 1 for v in weight.values())


def test_measured_score_is_the_loss_increase_of_switching_one_unit_off(glowq_s_model):
    model, report = quantized_copy(glowq_s_model)
    _, _, batches = glowq_s_model
    corrections = Corrections(model)
    ids = torch.randint(0, 128, (1, 12))
    before = logits(model, ids)
    scores = unit_scores(corrections, report, "measured", model=model, batches=batches, progress=False)
    name = corrections.names[1]
    base = calibration_loss(model, batches)
    corrections.set(set(corrections.names) - {name})
    assert scores[name] == pytest.approx(calibration_loss(model, batches) - base, rel=1e-9, abs=1e-12)
    corrections.set(corrections.names)
    assert torch.equal(logits(model, ids), before)  # the scoring left every correction on
    with pytest.raises(ValueError, match="needs the model"):
        unit_scores(corrections, report, "measured")


def test_sweep_ends_are_rtn_and_full_glowq(glowq_s_model):
    model, report = quantized_copy(glowq_s_model)
    rtn, _ = quantized_copy(glowq_s_model, method="none")
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


def test_sweep_elbow_against_latency_keeps_the_best_point_per_cost():
    # latency grows by 1 ms per unit up to k=4, then by 0 for k=5 (a unit whose timing was noise)
    pts = [SweepPoint(k, 100 * k, 30.0 - (2.0 * k if k <= 4 else 8 + 0.1 * (k - 4)), float(min(k, 4) if k <= 5
                                                                                         else k - 1))
           for k in range(12)]
    elbow = sweep_elbow(pts, "latency")
    assert elbow.k == 5  # k=4 and k=5 cost 4 ms: the better perplexity stands for that cost
    with pytest.raises(ValueError, match="no latencies"):
        sweep_elbow([SweepPoint(0, 0, 3.0), SweepPoint(1, 1, 2.0), SweepPoint(2, 2, 1.9)], "latency")
    with pytest.raises(ValueError, match="cost must be"):
        sweep_elbow(pts, "flops")


def test_correction_latency_times_each_shape_once_and_sweeps_sum_it(glowq_s_model):
    model, report = quantized_copy(glowq_s_model)
    corrections = Corrections(model)
    corrections.set(corrections.names[:1])  # timing switches everything on, then restores this
    latency, per_unit = correction_latency(corrections, tokens=1, reps=2, trials=3)
    assert corrections.enabled == set(corrections.names[:1])
    # 2 layers x (q/k/v, o, gate/up, down): four shapes, each layer's units share them
    assert len(latency.correction_ms) == 4 and set(per_unit) == set(corrections.names)
    for name in corrections.names:
        twin = name.replace("layers.0.", "layers.1.")
        assert per_unit[name] == per_unit[twin]
    assert all(v > 0 for v in latency.uncorrected_ms.values())
    assert all(v >= 0 for v in latency.correction_ms.values())
    order = order_by(unit_scores(corrections, report), corrections)
    points = sweep(model, corrections, order, torch.randint(0, 128, (100,)), [0, 3, len(order)], seq_len=50,
                   latency_ms=per_unit, progress=False)
    assert points[0].latency_ms == 0
    assert points[1].latency_ms == pytest.approx(sum(per_unit[n] for n in order[:3]))
    assert points[2].latency_ms == pytest.approx(sum(per_unit.values()))
    with pytest.raises(ValueError, match="no time for units"):
        sweep(model, corrections, order, torch.randint(0, 128, (100,)), [1], seq_len=50, latency_ms={},
              progress=False)


def test_rank_sweep_restores_every_unit_at_each_rank_and_leaves_the_model_alone(glowq_s_model, monkeypatch):
    from glowq_fx.selective import latency as latency_mod

    model, cal, _ = glowq_s_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full, report = quantized_copy(glowq_s_model)  # rank 8
    units = len(Corrections(full).names)
    tokens = torch.randint(0, 128, (150,))
    monkeypatch.setattr(latency_mod, "time_ms", lambda fn, reps, device: (fn(), 0.25)[1])
    points = rank_sweep(model, cal, GlowQConfig(group_size=32, rank=8), [8, 4, 2], tokens, seq_len=64,
                        latency_tokens=1, progress=False)
    assert sorted(points) == [2, 4, 8]
    # the same calibration, config and sketch seed: rank 8 is the fully restored model itself
    assert points[8].perplexity == perplexity(full, tokens, 64, progress=False).perplexity
    assert points[8].factor_bytes == report.total("factor_bytes")
    # A_i (N x r) and B (r x K) are linear in r
    assert points[4].factor_bytes * 2 == points[8].factor_bytes == points[2].factor_bytes * 4
    assert all(p.k == units and p.latency_ms is not None for p in points.values())
    assert len({p.perplexity for p in points.values()}) == 3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="selective=None"):
        rank_sweep(model, cal, GlowQConfig(group_size=32, selective=0.5), [4], tokens, progress=False)
    with pytest.raises(ValueError, match="positive ints"):
        rank_sweep(model, cal, GlowQConfig(group_size=32), [0], tokens, progress=False)
