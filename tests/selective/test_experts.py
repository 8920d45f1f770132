"""GlowQ-S over MoE experts: each experts correction (a shared B with every weight and dense group
reading it, or one weight's per-expert B) is ranked with the dense groups and kept or dropped as a
whole; the model, the report and a checkpoint agree on what was kept."""
import copy
import math
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
