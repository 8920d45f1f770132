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


def _calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda _m, a, out: calls.append(tuple(out.shape)))


def test_calibration_stops_at_the_head_once_every_group_is_fed(llama):
    """No logits: the head never runs, unless a group reads its input (then it is fed with every
    token and stopped right after) or a group is not fed yet (the pass goes on)."""
    batches = [llama_batch(seed=s) for s in range(2)]
    groups = input_sharing_groups(llama, lambda m: m(**llama_batch()))
    body = [g for g in groups if g.members != ("lm_head",)]
    head = [g for g in groups if g.members == ("lm_head",)]
    assert head, "the hook grouping sees the head"
    calls, h = _calls(llama.lm_head)
    try:
        stopped = collect_statistics(llama, body, batches, lambda m, b: m(**b), dtype="float64")
        with_head = collect_statistics(llama, body + head, batches, lambda m, b: m(**b), dtype="float64")
    finally:
        h.remove()
    assert calls == []  # the head's output was never computed
    assert with_head["lm_head"].n_tokens == sum(b["attention_mask"].sum().item() for b in batches)
    g = body[-1]  # the last group before the head: the same S as passes run to the end
    xs = []
    first = llama.get_submodule(g.members[0])
    h = first.register_forward_pre_hook(lambda _m, a: xs.append(a[0].detach().reshape(-1, g.in_features).double()))
    try:
        with torch.no_grad():
            for b in batches:
                llama(**b)
    finally:
        h.remove()
    X = torch.cat(xs)
    torch.testing.assert_close(stopped[g.name].value(), X.T @ X / X.shape[0], rtol=1e-9, atol=1e-12)


def test_the_capture_asks_for_the_last_positions_logits_only(llama):
    from glowq_fx import find_groups

    seen, h = _calls(llama.lm_head)
    try:
        find_groups(llama, llama_batch())
    finally:
        h.remove()
    assert seen and all(shape[1] == 1 for shape in seen)  # (batch, 1, vocab): logits_to_keep=1
