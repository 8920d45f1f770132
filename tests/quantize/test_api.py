"""quantize_: methods, quantizers, the report, given groups, and every bad input."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glowq_fx import GlowQConfig, GlowQWarning, find_groups, quantize_
from glowq_fx.modules import QuantizedLinear
from tests_helpers import tiny_llama, token_batches

V = 128


def test_independent_methods_get_one_projection_per_member():
    model = tiny_llama()
    report = quantize_(model, token_batches(), GlowQConfig(group_size=32, rank=48, method="qera"), progress=False)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.projection is not attn.k_proj.projection
    assert attn.k_proj.rank == 32 and attn.q_proj.rank == 48  # k_proj has 32 outputs: its rank is capped
    assert report.groups[0].rank == 48


def test_method_none_stores_no_factors():
    model = tiny_llama()
    report = quantize_(model, token_batches(), GlowQConfig(method="none"), progress=False)
    assert report.total("factor_bytes") == 0
    assert all(m.rank == 0 for m in model.modules() if isinstance(m, QuantizedLinear))


def test_gptq_lowers_the_error_before_correction():
    rtn, gptq = tiny_llama(), tiny_llama()
    cal = token_batches(6)
    r = quantize_(rtn, cal, GlowQConfig(group_size=32, rank=0), progress=False)
    g = quantize_(gptq, cal, GlowQConfig(group_size=32, rank=0, quantizer="gptq"), progress=False)
    assert g.total("error_before") < r.total("error_before")


MOE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, num_experts_per_tok=2)


# ---- bad inputs -------------------------------------------------------------------------------


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
    model = tiny_llama()
    groups = find_groups(model, token_batches(1)[0]).groups
    with pytest.raises(ValueError, match="appears in two groups"):
        quantize_(copy.deepcopy(model), token_batches(1), groups=[groups[0], groups[0]], progress=False)
    with pytest.raises(ValueError, match="must be InputGroup"):
        quantize_(copy.deepcopy(model), token_batches(1), groups=["q_proj"], progress=False)
    with pytest.raises(ValueError, match="config must be a GlowQConfig"):
        quantize_(model, token_batches(1), {"rank": 4}, progress=False)


def test_model_restored_to_training_mode_and_no_warning_for_a_clean_model():
    model = tiny_llama().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GlowQWarning)
        quantize_(model, token_batches(1), GlowQConfig(rank=4), progress=False)
    assert model.training


def test_eager_forward_of_a_quantized_model_compiles(gen):
    """The swapped modules are plain torch: torch.compile with the default backend traces them."""
    model = tiny_llama()
    quantize_(model, token_batches(2), GlowQConfig(group_size=32, rank=8), progress=False)
    ids = token_batches(1, seed=3)[0]["input_ids"]
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="eager")(ids).logits
    torch.testing.assert_close(compiled, eager)
    assert F.cosine_similarity(compiled.flatten(), eager.flatten(), dim=0) > 0.999
