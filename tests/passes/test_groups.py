"""passes.groups: group names, the filter's reasons, subsets of a group."""
import pytest

from passes.groups import GroupFilter, InputGroup, group_name


def test_group_name():
    assert group_name(["a.b.q", "a.b.k"]) == "a.b.{q,k}"
    assert group_name(["x.fc"]) == "x.fc"
    assert group_name(["h.0.attn.q", "h.0.mlp.fc"]) == "h.0.{attn.q,mlp.fc}"


@pytest.mark.parametrize("module, out_features, reason", [
    ("lm_head", 100, "the head"),
    ("model.0.mlp.up", 100, "matches none of the include patterns"),
    ("model.0.attn.v_proj", 100, "matches the exclude pattern"),
    ("model.0.attn.q_proj", 4, "out_features 4 < min_out_features 8"),
    ("model.0.attn.q_proj", 8, None),
])
def test_filter_names_why_a_module_is_left_out(module, out_features, reason):
    f = GroupFilter(skip={"lm_head": "the head"}, include=(r"attn|lm_head",), exclude=(r"v_proj$",), min_out_features=8)
    why = f.reason(module, out_features)
    assert why is None if reason is None else reason in why


def test_subset_keeps_the_given_order_and_widths():
    g = InputGroup(group_name(["l.q", "l.k", "l.v"]), ("l.q", "l.k", "l.v"), 64, (64, 16, 16))
    sub = g.subset(["l.v", "l.q"])
    assert sub == InputGroup("l.{v,q}", ("l.v", "l.q"), 64, (16, 64))
