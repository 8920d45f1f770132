"""capture.hooks: groups from forward hooks, tensor identity without keeping tensors alive."""
import pytest
import torch
from torch import nn

from glowq_fx.capture.hooks import TensorKeys, input_sharing_groups
from tests_helpers import llama_batch


def test_llama_groups_from_first_principles(llama):
    groups = {g.name: g for g in input_sharing_groups(llama, lambda m: m(**llama_batch()))}
    for i in range(4):
        p = f"model.layers.{i}."
        qkv = groups[p + "self_attn.{q_proj,k_proj,v_proj}"]
        assert qkv.members == (p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj")
        assert qkv.in_features == 256 and qkv.out_features == (256, 64, 64)
        assert groups[p + "mlp.{gate_proj,up_proj}"].out_features == (688, 688)
        assert groups[p + "self_attn.o_proj"].members == (p + "self_attn.o_proj",)
        assert groups[p + "mlp.down_proj"].in_features == 688
    assert len(groups) == 4 * 4 + 1  # + lm_head


def test_no_linear_model_raises():
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D layers"):
        input_sharing_groups(nn.Sequential(nn.ReLU()), lambda m: m(torch.ones(2)))


def test_tensor_keys_follow_identity_without_keeping_tensors_alive():
    keys = TensorKeys()
    a = torch.ones(3)
    ka = keys.key(a)
    assert keys.key(a) == ka and keys.get(a) == ka
    view = a.view(3)  # another tensor object: another key
    assert keys.key(view) != ka
    del a, view
    b = torch.zeros(3)  # may land at a freed id: must not inherit a dead tensor's key
    assert keys.get(b) is None and keys.key(b) not in (ka,)
