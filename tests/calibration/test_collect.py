"""calibration.collect: one S per group, fed once per batch, padding excluded."""
import pytest
import torch

from glowq_fx.calibration.collect import collect_statistics
from glowq_fx.capture.hooks import input_sharing_groups
from tests_helpers import llama_batch


def test_statistics_fed_once_per_group_perllama_batch(llama):
    groups = [g for g in input_sharing_groups(llama, lambda m: m(**llama_batch())) if "layers.1." in g.name]
    seen = {}
    h = llama.model.layers[1].self_attn.k_proj.register_forward_pre_hook(
        lambda _m, a: seen.setdefault("x", []).append(a[0].detach().reshape(-1, 256).double()))
    batches = [llama_batch(seed=s) for s in range(3)]
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
    groups = input_sharing_groups(llama, lambda m: m(**llama_batch()))[:1]
    bad = {**llama_batch(), "attention_mask": torch.ones(1, 5)}
    with pytest.raises(ValueError, match="attention_mask has 5 tokens but the input has 24"):
        collect_statistics(llama, groups, [bad], lambda m, b: m(input_ids=b["input_ids"]))
