import pytest
import torch
from torch import nn

from glowq_fx.hooks import TensorKeys, collect_statistics, group_name, input_sharing_groups
from tests_helpers import random_llama


@pytest.fixture(scope="module")
def llama():
    return random_llama()


def _batch(n=2, t=12, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (n, t), generator=g), "attention_mask": torch.ones(n, t, dtype=torch.long)}


def test_llama_groups_from_first_principles(llama):
    groups = {g.name: g for g in input_sharing_groups(llama, lambda m: m(**_batch()))}
    for i in range(4):
        p = f"model.layers.{i}."
        qkv = groups[p + "self_attn.{q_proj,k_proj,v_proj}"]
        assert qkv.members == (p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj")
        assert qkv.in_features == 256 and qkv.out_features == (256, 64, 64)
        assert groups[p + "mlp.{gate_proj,up_proj}"].out_features == (688, 688)
        assert groups[p + "self_attn.o_proj"].members == (p + "self_attn.o_proj",)
        assert groups[p + "mlp.down_proj"].in_features == 688
    assert len(groups) == 4 * 4 + 1  # + lm_head


def test_statistics_fed_once_per_group_per_batch(llama):
    groups = [g for g in input_sharing_groups(llama, lambda m: m(**_batch())) if "layers.1." in g.name]
    seen = {}
    h = llama.model.layers[1].self_attn.k_proj.register_forward_pre_hook(
        lambda _m, a: seen.setdefault("x", []).append(a[0].detach().reshape(-1, 256).double()))
    batches = [_batch(seed=s) for s in range(3)]
    batches[2]["attention_mask"][0, 7:] = 0  # padding excluded
    try:
        stats = collect_statistics(llama, groups, batches, lambda m, b: m(**b), dtype="float64")
    finally:
        h.remove()
    s = stats["model.layers.1.self_attn.{q_proj,k_proj,v_proj}"]
    assert s.n_batches == 3 and s.n_tokens == 2 * 12 * 3 - 5
    keep = torch.cat([torch.ones(48, dtype=torch.bool), batches[2]["attention_mask"].reshape(-1).bool()])
    X = torch.cat(seen["x"])[keep]
    torch.testing.assert_close(s.value(), X.T @ X / X.shape[0], rtol=1e-9, atol=1e-12)


def test_mask_that_does_not_cover_the_tokens_raises(llama):
    groups = input_sharing_groups(llama, lambda m: m(**_batch()))[:1]
    bad = {**_batch(), "attention_mask": torch.ones(1, 5)}
    with pytest.raises(ValueError, match="attention_mask has 5 tokens but the input has 24"):
        collect_statistics(llama, groups, [bad], lambda m, b: m(input_ids=b["input_ids"]))


def test_no_linear_model_raises():
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D layers"):
        input_sharing_groups(nn.Sequential(nn.ReLU()), lambda m: m(torch.ones(2)))


def test_group_name():
    assert group_name(["a.b.q", "a.b.k"]) == "a.b.{q,k}"
    assert group_name(["x.fc"]) == "x.fc"


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
