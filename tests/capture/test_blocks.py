"""capture.blocks: the repeated blocks of every test architecture, found without names."""
import pytest
from torch import nn

from architectures import ARCHS, LAYERS
from glowq_fx import GlowQWarning
from glowq_fx.capture.blocks import Blocks, assign_groups, find_blocks
from passes.groups import InputGroup, group_name

# written out from each architecture's source, not read from the library
CONTAINERS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers",
              "gemma": "model.layers", "phi3": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers",
              "falcon": "transformer.h", "gptj": "transformer.h", "gpt_neox": "gpt_neox.layers", "novel": "blocks",
              "novel_mixed_dtypes": "blocks"}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_blocks_of_every_architecture(arch):
    blocks = find_blocks(ARCHS[arch][0]())
    container = CONTAINERS[arch]
    assert blocks == Blocks(container, tuple(f"{container}.{i}" for i in range(LAYERS)))


class Layer(nn.Sequential):
    pass


class TwoLists(nn.Module):
    """A long list of small blocks and a short list of big ones: the linears decide, not the length."""

    def __init__(self):
        super().__init__()
        self.small = nn.ModuleList(Layer(nn.Linear(4, 4)) for _ in range(6))
        self.big = nn.ModuleList(nn.Sequential(*(nn.Linear(4, 4) for _ in range(4))) for _ in range(2))
        self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))])


def test_the_list_whose_blocks_hold_most_linears_wins_and_mixed_lists_are_not_blocks():
    assert find_blocks(TwoLists()).container == "big"
    assert find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))) is None  # a ReLU has no linear
    assert find_blocks(nn.Linear(4, 4)) is None


def test_declared_unsplittable_blocks_are_preferred_and_a_mismatch_is_said():
    model = TwoLists()
    model._no_split_modules = ["Conv1d"]
    with pytest.warns(GlowQWarning, match="none of the classes TwoLists declares unsplittable"):
        assert find_blocks(model).container == "big"
    model._no_split_modules = ["Layer"]  # fewer linears, but the class the model names
    assert find_blocks(model).container == "small"


def test_groups_straddling_blocks_are_split_by_block():
    blocks = Blocks("layers", ("layers.0", "layers.1"))
    members = ("layers.0.a", "layers.1.b", "head")
    g = InputGroup(group_name(members), members, 8, (4, 5, 6))
    inside = InputGroup("layers.1.{c,d}", ("layers.1.c", "layers.1.d"), 8, (2, 3))
    per_block, outside, split = assign_groups([g, inside], blocks)
    assert split == [g.name]
    assert per_block == [[g.subset(["layers.0.a"])], [g.subset(["layers.1.b"]), inside]]
    assert outside == [g.subset(["head"])]
    assert blocks.index_of("layers.10.x") is None and blocks.index_of("layers.1") == 1
