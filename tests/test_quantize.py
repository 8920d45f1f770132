"""quantize_ and find_groups: runtime modules, report, fallbacks and every bad input."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

import glowq_fx.capture as capture
from glowq_fx import GlowQConfig, GlowQWarning, find_groups, quantize_
from glowq_fx.modules import QuantizedLinear, SharedProjection
from tests_helpers import tiny_llama_config

V = 128


def _llama(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T.LlamaForCausalLM(tiny_llama_config()).eval()


def _batches(n=3, seed=0, t=24):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, V, (2, t), generator=g)} for _ in range(n)]


def test_quantized_linear_matches_its_formula(gen):
    model = _llama()
    report = quantize_(model, _batches(), GlowQConfig(group_size=32, rank=8), progress=False)
    q = model.model.layers[0].self_attn.k_proj
    assert isinstance(q, QuantizedLinear) and q.rank == 8
    B = q.projection.B
    x = torch.randn(5, 64, generator=gen)
    expected = x @ (q.dequantized_weight() + q.A @ B).T
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-6)
    # one B per group, shared by reference and registered once on the attention module
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.projection is attn.k_proj.projection is attn.v_proj.projection
    assert isinstance(attn.glowq_projections["{q_proj,k_proj,v_proj}"], SharedProjection)
    keys = [k for k in model.state_dict() if k.endswith(".B")]
    assert len(keys) == len(report.groups)
    # the report adds up what the modules hold
    g = report.groups[0]
    members = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert g.code_bytes == sum(m.qweight.nbytes for m in members)
    assert g.scale_bytes == sum(m.scales.nbytes + m.zeros.nbytes for m in members)
    assert g.factor_bytes == sum(m.A.nbytes for m in members) + B.nbytes
    assert g.error_after < g.error_before
    json.dumps(report.to_dict())
    text = str(report)
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in text and "lm_head" in text


def test_independent_methods_get_one_projection_per_member():
    model = _llama()
    report = quantize_(model, _batches(), GlowQConfig(group_size=32, rank=48, method="qera"), progress=False)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.projection is not attn.k_proj.projection
    assert attn.k_proj.rank == 32 and attn.q_proj.rank == 48  # k_proj has 32 outputs: its rank is capped
    assert report.groups[0].rank == 48


def test_method_none_stores_no_factors():
    model = _llama()
    report = quantize_(model, _batches(), GlowQConfig(method="none"), progress=False)
    assert report.total("factor_bytes") == 0
    assert all(m.rank == 0 for m in model.modules() if isinstance(m, QuantizedLinear))


def test_gptq_lowers_the_error_before_correction():
    rtn, gptq = _llama(), _llama()
    cal = _batches(6)
    r = quantize_(rtn, cal, GlowQConfig(group_size=32, rank=0), progress=False)
    g = quantize_(gptq, cal, GlowQConfig(group_size=32, rank=0, quantizer="gptq"), progress=False)
    assert g.total("error_before") < r.total("error_before")


def test_output_head_and_patterns():
    model = _llama()
    found = find_groups(model, _batches(1)[0], GlowQConfig(quantize_output_head=True, exclude=(r"down_proj",)))
    members = {m for g in found.groups for m in g.members}
    assert "lm_head" in members
    assert not any("down_proj" in m for m in members)


class WithBreak(nn.Module):
    """Data-dependent control flow between the readers of one tensor."""

    def __init__(self):
        super().__init__()
        self.norm, self.a, self.b, self.c = nn.LayerNorm(32), nn.Linear(32, 40), nn.Linear(32, 48), nn.Linear(32, 36)

    def forward(self, x):
        h = self.norm(x)
        y = self.a(h).sum(-1)
        if y.sum() > 0:  # graph break
            y = y * 2
        return y + self.b(h.reshape(-1, 32)).sum(-1).view(y.shape) + self.c(h).sum(-1)


def test_graph_break_is_named_and_groups_are_stitched(gen):
    model = WithBreak()
    x = torch.randn(2, 6, 32, generator=gen)
    with pytest.warns(GlowQWarning, match=r"graph breaks: .*line \d+.*if y.sum\(\) > 0"):
        found = find_groups(model, x)
    assert found.pieces == 2
    assert [g.name for g in found.groups] == ["{a,b,c}"]


def test_capture_failure_falls_back_to_hooks(monkeypatch, gen):
    def broken(*_args, **_kwargs):
        raise RuntimeError("simulated Dynamo failure")

    monkeypatch.setattr(capture, "capture_graphs", broken)
    model = WithBreak()
    with pytest.warns(GlowQWarning, match="simulated Dynamo failure.*falling back to forward hooks"):
        found = find_groups(model, torch.randn(2, 6, 32, generator=gen))
    # hooks see a and c share h; b reads a reshape of it (a new tensor), so it stands alone
    assert [g.name for g in found.groups] == ["{a,c}", "b"]
    assert found.from_hooks == ["a", "b", "c"]


class Hidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(16, 32)

    @torch.compiler.disable
    def hidden(self, x):
        return self.b(x)

    def forward(self, x):
        return self.a(x) + self.hidden(x)


def test_linears_outside_the_graph_are_grouped_by_hooks_with_a_warning(gen):
    with pytest.warns(GlowQWarning, match=r"1 linears ran but are in no captured graph \(b\)"):
        found = find_groups(Hidden(), torch.randn(3, 16, generator=gen))
    assert sorted(g.name for g in found.groups) == ["a", "b"] and found.from_hooks == ["b"]


MOE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, num_experts_per_tok=2)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_dense_linears_only_with_a_warning(arch):
    if arch == "mixtral":
        model = T.MixtralForCausalLM(T.MixtralConfig(**MOE, num_local_experts=4)).eval()
    else:
        model = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**MOE, moe_intermediate_size=32, num_experts=4,
                                                       shared_expert_intermediate_size=64)).eval()
    with pytest.warns(GlowQWarning, match=r"leaving 1 MoE expert modules unquantized \(model.layers.0.mlp.experts\)"):
        report = quantize_(model, _batches(2), GlowQConfig(group_size=32, rank=8), progress=False)
    names = [g.name for g in report.groups]
    assert names[:2] == ["model.layers.0.self_attn.{q_proj,k_proj,v_proj}", "model.layers.0.self_attn.o_proj"]
    assert "model.layers.0.mlp.gate" in report.skipped  # the router (N = 4 experts)
    if arch == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert.{gate_proj,up_proj}" in names
        assert "min_out_features" in report.skipped["model.layers.0.mlp.shared_expert_gate"]  # N = 1
    assert not isinstance(model.model.layers[0].mlp.experts, QuantizedLinear)
    with torch.no_grad():
        assert torch.isfinite(model(**_batches(1, seed=5)[0]).logits).all()


# ---- bad inputs -------------------------------------------------------------------------------

def test_no_linear_model():
    with pytest.raises(ValueError, match="has no nn.Linear or Conv1D layers"):
        quantize_(nn.Sequential(nn.ReLU()), [torch.ones(2, 3)], progress=False)


def test_already_quantized():
    model = _llama()
    quantize_(model, _batches(1), GlowQConfig(rank=4), progress=False)
    with pytest.raises(ValueError, match="already quantized by glowq-fx"):
        quantize_(model, _batches(1), progress=False)
    other = _llama()
    other.config.quantization_config = {"quant_method": "gptq"}
    with pytest.raises(ValueError, match=r"already quantized \(quantization_config: gptq\)"):
        quantize_(other, _batches(1), progress=False)
    int8 = nn.Sequential(nn.Linear(4, 4))
    int8[0].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"0 has a torch.int8 weight"):
        quantize_(int8, [torch.ones(1, 4)], progress=False)


@pytest.mark.parametrize("bad, match", [
    ([], "calibration is empty"),
    (5, "must be an iterable of batches"),
    ([{"input_ids": torch.rand(2, 8)}], "input_ids must be integer token ids"),
    ([{"input_ids": torch.zeros(8, dtype=torch.long)}], r"must be \(batch, sequence\)"),
    ([{"input_ids": torch.zeros(2, 0, dtype=torch.long)}], "is empty"),
    ([{"input_ids": torch.full((1, 4), V)}], r"token ids span \[128, 128\] but the vocabulary has 128"),
    ([{"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 5)}],
     "attention_mask shape"),
    ([{"input_ids": torch.zeros(1, 4, dtype=torch.long, device="meta")}], "is on meta but the model is on cpu"),
    ([{"inputs_embeds": torch.zeros(1, 4, 64, dtype=torch.float64)}], "is torch.float64 but the model computes"),
    (["text"], "holds no tensor"),
])
def test_bad_calibration(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize_(_llama(), bad, progress=False)


class MixedDtypes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(16, 32).double()

    def forward(self, x):
        return self.a(x).sum() + self.b(x.double()).sum()


def test_members_with_different_dtypes(gen):
    with pytest.raises(ValueError, match=r"members of \{a,b\} .* different dtypes .*b: torch.float64.*model.to"):
        find_groups(MixedDtypes(), torch.randn(2, 16, generator=gen))


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.b(torch.log(self.a(x)))  # NaN for negative pre-activations


def test_nan_activations_name_the_group(gen):
    with pytest.raises(ValueError, match=r"^b: .*(NaN|finite)"):
        quantize_(Exploding(), [torch.randn(4, 8, generator=gen)], progress=False)


def test_bad_given_groups():
    model = _llama()
    groups = find_groups(model, _batches(1)[0]).groups
    with pytest.raises(ValueError, match="appears in two groups"):
        quantize_(copy.deepcopy(model), _batches(1), groups=[groups[0], groups[0]], progress=False)
    with pytest.raises(ValueError, match="must be InputGroup"):
        quantize_(copy.deepcopy(model), _batches(1), groups=["q_proj"], progress=False)
    with pytest.raises(ValueError, match="config must be a GlowQConfig"):
        quantize_(model, _batches(1), {"rank": 4}, progress=False)


def test_model_restored_to_training_mode_and_no_warning_for_a_clean_model():
    model = _llama().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GlowQWarning)
        quantize_(model, _batches(1), GlowQConfig(rank=4), progress=False)
    assert model.training


def test_eager_forward_of_a_quantized_model_compiles(gen):
    """The swapped modules are plain torch: torch.compile with the default backend traces them."""
    model = _llama()
    quantize_(model, _batches(2), GlowQConfig(group_size=32, rank=8), progress=False)
    ids = _batches(1, seed=3)[0]["input_ids"]
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="eager")(ids).logits
    torch.testing.assert_close(compiled, eager)
    assert F.cosine_similarity(compiled.flatten(), eager.flatten(), dim=0) > 0.999
