"""capture.groups: find_groups from the captured graph, its fallbacks, filters and warnings."""
import pytest
import torch
import transformers as T
from torch import nn

import glowq_fx.capture.groups as capture
from glowq_fx import GlowQConfig, GlowQWarning, find_groups, quantize_
from glowq_fx.modules.experts import QuantizedExperts
from tests_helpers import tiny_llama, token_batches

V = 128
MOE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, num_experts_per_tok=2)


def test_output_head_and_patterns():
    model = tiny_llama()
    found = find_groups(model, token_batches(1)[0], GlowQConfig(quantize_output_head=True, exclude=(r"down_proj",)))
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


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_routers_stay_in_full_precision_and_the_experts_are_quantized(arch):
    if arch == "mixtral":
        model = T.MixtralForCausalLM(T.MixtralConfig(**MOE, num_local_experts=4)).eval()
    else:
        model = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**MOE, moe_intermediate_size=32, num_experts=4,
                                                       shared_expert_intermediate_size=64)).eval()
    report = quantize_(model, token_batches(2), GlowQConfig(group_size=32, rank=8), progress=False)
    names = [g.name for g in report.groups]
    assert names[:2] == ["model.layers.0.self_attn.{q_proj,k_proj,v_proj}", "model.layers.0.self_attn.o_proj"]
    assert "model.layers.0.mlp.gate" in report.skipped  # the router (N = 4 experts)
    if arch == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert.{gate_proj,up_proj}" in names
        assert "min_out_features" in report.skipped["model.layers.0.mlp.shared_expert_gate"]  # N = 1
    assert isinstance(model.model.layers[0].mlp.experts, QuantizedExperts)
    assert "model.layers.0.mlp.experts.gate_up_proj" in names  # the experts' rows (quantize_experts)
    with torch.no_grad():
        assert torch.isfinite(model(**token_batches(1, seed=5)[0]).logits).all()


class MixedDtypes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(16, 32).double()

    def forward(self, x):
        return self.a(x).sum() + self.b(x.double()).sum()


def test_members_with_different_dtypes(gen):
    with pytest.raises(ValueError, match=r"members of \{a,b\} .* different dtypes .*b: torch.float64.*model.to"):
        find_groups(MixedDtypes(), torch.randn(2, 16, generator=gen))
