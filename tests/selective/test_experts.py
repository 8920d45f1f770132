"""GlowQ-S over MoE experts: each experts correction (a shared B with every weight and dense group
reading it, or one weight's per-expert B) is ranked with the dense groups and kept or dropped as a
whole; the model, the report and a checkpoint agree on what was kept."""
import copy
import math
import re
import warnings

import pytest
import torch
import transformers as T

from glowq_fx import GlowQConfig, GlowQWarning, load_quantized, quantize_, save_quantized
from glowq_fx.modules.experts import QuantizedExperts
from glowq_fx.modules.linear import QuantizedLinear
from glowq_fx.selective.corrections import Corrections
from tests_helpers import MOE_CONFIGS, token_batches

CONFIGS = {name: MOE_CONFIGS[name] for name in ("mixtral", "qwen2_moe")}
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def _model(name):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


def _quantized(name, **config):
    model = _model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GlowQWarning)
        report = quantize_(model, token_batches(4), GlowQConfig(group_size=32, rank=8, output_head_bits=None,
                                                                **config), progress=False)
    return model, report


def _corrected(model, row_name) -> bool:
    """Whether the module of a report row (a linear of a dense group, or an experts weight) holds a correction."""
    parent, _, child = row_name.rpartition(".")
    module = model.get_submodule(parent)
    if isinstance(module, QuantizedExperts):
        return module.quantized_weights(child).A is not None
    members = [m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and n.startswith(row_name)]
    if not members:  # a dense group row is named by its members' common prefix and their names
        members = [model.get_submodule(f"{parent}.{c}") for c in child.strip("{}").split(",")]
    return all(m.A is not None for m in members)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_fraction_ranks_the_experts_with_the_dense_groups(name):
    model, report = _quantized(name, selective=0.5)
    candidates = [g for g in report.groups if g.candidate_factor_bytes > 0]
    assert any(".experts." in g.name for g in candidates)
    assert sum(g.restored for g in candidates) == math.ceil(len(candidates) / 2)
    for g in report.groups:
        if ".experts." in g.name or g.candidate_factor_bytes > 0:
            assert _corrected(model, g.name) == g.restored, g.name
            if not g.restored:
                assert g.error_after == g.error_before and g.rank == 0 and g.factor_bytes == 0


def test_a_shared_B_keeps_or_drops_every_member_together():
    """Qwen2-MoE's shared expert reads the experts' input: its gate/up share the experts' B, so
    they are kept or dropped with the experts' unit, whatever the policy chose for the rest."""
    for fraction in (0.2, 1.0):
        model, report = _quantized("qwen2_moe", selective=fraction)
        for layer in range(2):
            leader = next(g for g in report.groups if g.name == f"model.layers.{layer}.mlp.experts.gate_up_proj")
            shared = model.get_submodule(f"model.layers.{layer}.mlp.shared_expert.gate_proj")
            assert (shared.A is not None) == leader.restored
            joined = [g for g in report.groups if g.name.startswith(f"model.layers.{layer}.mlp.shared_expert.")
                      and "gate_proj" in g.name]
            assert joined and all(g.restored == leader.restored for g in joined)


def test_auto_runs_over_experts_and_the_checkpoint_keeps_what_was_kept(tmp_path):
    model, report = _quantized("mixtral", selective="auto")
    experts_units = [g for g in report.groups if ".experts." in g.name and g.candidate_factor_bytes > 0]
    dense_units = [g for g in report.groups if ".experts." not in g.name and g.candidate_factor_bytes > 0]
    assert report.selection["candidates"] == len(experts_units) + len(dense_units)
    for g in experts_units:
        assert _corrected(model, g.name) == g.restored
    save_quantized(model, tmp_path / "q", report=report)
    loaded = load_quantized(tmp_path / "q", _model("mixtral"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_the_live_switch_holds_the_experts_units():
    """Corrections (the switch the loss curve turns) knows every experts unit; off and on again
    gives the same model bit for bit."""
    model, _ = _quantized("mixtral")
    corrections = Corrections(model)
    names = corrections.names
    assert any("experts.gate_up_proj" in n for n in names) and any("experts.down_proj" in n for n in names)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        corrections.set([])
        off = model(input_ids=IDS).logits
        corrections.set(names)
        again = model(input_ids=IDS).logits
    assert not torch.equal(off, before) and torch.equal(again, before)
    experts = model.model.layers[0].mlp.experts
    assert corrections.nbytes(next(n for n in names if "layers.0.mlp.experts.down_proj" in n)) == (
        experts.quantized_weights("down_proj").A.nbytes + experts.quantized_weights("down_proj").B.nbytes)
    copy.deepcopy(model)  # still a plain module tree


def test_the_latency_model_names_experts_units_as_out_of_its_scope():
    from glowq_fx.selective.latency import unit_shape

    model, _ = _quantized("mixtral")
    corrections = Corrections(model)
    unit = next(n for n in corrections.names if "experts" in n)
    with pytest.raises(ValueError, match=r"holds MoE experts weights .*\(selective='auto' or a fraction\)"):
        unit_shape(corrections.modules(unit))


def _weights(model):
    from glowq_fx.modules.experts import QuantizedExpertWeights

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedExpertWeights)}


def _factor_bytes(model):
    """Bytes of every correction factor the model holds, each shared B once."""
    from glowq_fx.modules.experts import QuantizedExpertWeights

    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, (QuantizedLinear, QuantizedExpertWeights)):
            total += sum(t.nbytes for t in (m.A, getattr(m, "B", None)) if t is not None)
            if m.projection is not None and id(m.projection) not in seen:
                seen.add(id(m.projection))
                total += m.projection.B.nbytes
    return total


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_per_expert_selection_keeps_the_experts_that_pay_and_equals_zeroing_the_others(name):
    """expert_selection='per-expert' against 'whole' (the default) on the same calibration: the
    kept experts' factors are the whole model's rows, bit for bit; the dropped experts are exactly
    those scoring below the bar per byte; the model equals the whole one with the dropped ``A_e``
    zeroed; the report's bytes are the model's, and its errors add back what was dropped."""
    model, report = _quantized(name, selective=1.0, expert_selection="per-expert")
    whole, whole_report = _quantized(name, selective=1.0)  # expert_selection="whole", the default
    per = report.selection["per_expert"]
    assert per["dropped"] > 0, "this calibration routes too evenly for any expert to fall below the bar"
    rows = {g.name: g for g in report.groups}
    whole_rows = {g.name: g for g in whole_report.groups}
    dropped = 0
    for key, w in _weights(model).items():
        full = _weights(whole)[key]
        if full.A is None:
            continue
        keep = w.corrected_experts if w.A is not None else torch.zeros(w.num_experts, dtype=torch.bool)
        dropped += int((~keep).sum())
        row = rows[key]
        assert row.corrected_experts == int(keep.sum())
        per_byte = full.A[0].nbytes + (0 if full.B is None else full.B[0].nbytes)
        for e, score in enumerate(row.member_scores):
            assert bool(keep[e]) == (score / per_byte >= per["bar"]), (key, e)
        if w.A is not None:
            assert torch.equal(w.A, full.A[keep]) and (w.B is None or torch.equal(w.B, full.B[keep]))
        full.A[~keep] = 0
        gone = [e for e in range(w.num_experts) if not keep[e]]
        assert row.error_after == pytest.approx(whole_rows[key].error_after + sum(row.member_gains[e] for e in gone))
    assert dropped == per["dropped"]
    assert report.total("factor_bytes") == _factor_bytes(model)
    assert whole_report.total("factor_bytes") - report.total("factor_bytes") == per["bytes_saved"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, whole(input_ids=IDS).logits)
    text = str(report)
    assert "per expert: the factors of" in text
    ragged = next(g for g in report.groups if g.corrected_experts is not None and g.corrected_experts < len(g.members))
    assert re.search(rf"{re.escape(ragged.name)}\s+{ragged.corrected_experts}/{len(ragged.members)}\s", text)
    assert whole_report.selection is None or "per_expert" not in whole_report.selection


def test_per_expert_auto_measures_the_loss_with_the_drops():
    model, report = _quantized("qwen2_moe", selective="auto", expert_selection="per-expert")
    per = report.selection.get("per_expert")
    assert per is not None and per["experts"] > 0
    if per["dropped"]:
        assert per["loss"] > 0 and per["loss_at_knee"] == next(
            p["loss"] for p in report.selection["curve"] if p["k"] == report.selection["kept"])


def test_a_per_expert_model_round_trips_through_both_loaders_and_the_live_switch(tmp_path):
    import json

    from glowq_fx.checkpoint.shards import CheckpointError

    model, report = _quantized("mixtral", selective=1.0, expert_selection="per-expert")
    ragged = {k: w for k, w in _weights(model).items() if w.factor_slots is not None}
    assert ragged
    save_quantized(model, tmp_path / "q", report=report)
    meta = json.loads((tmp_path / "q" / "glowq.json").read_text())
    for key, w in ragged.items():
        parent, _, child = key.rpartition(".")
        assert meta["experts"][parent]["weights"][child]["corrected_experts"] == w.A.shape[0]
    ours = load_quantized(tmp_path / "q", _model("mixtral"))
    theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        for loaded in (ours, theirs):
            assert torch.equal(loaded(input_ids=IDS).logits, want)
            assert {k for k, w in _weights(loaded).items() if w.factor_slots is not None} == set(ragged)
        corrections = Corrections(ours)  # off and on again: the kept experts only, as loaded
        corrections.set([])
        corrections.set(corrections.names)
        assert torch.equal(ours(input_ids=IDS).logits, want)
    # slots that do not number A's rows in order: refused after loading, before any forward
    key, w = next(iter(ragged.items()))
    slots = w.factor_slots.clone()
    first, second = (slots >= 0).nonzero().flatten()[:2].tolist() if int((slots >= 0).sum()) > 1 else (0, 0)
    w.factor_slots = slots.flip(0) if first == second else slots.index_put_((torch.tensor([first, second]),),
                                                                           slots[[second, first]])
    save_quantized(model, tmp_path / "bad")
    with pytest.raises(CheckpointError, match="factor_slots .* do not number"):
        load_quantized(tmp_path / "bad", _model("mixtral"))
