"""calibration.blockwise through quantize_: block by block equals the whole-model pass bit for bit
when the float outputs feed the next block; with the quantized outputs, each block is calibrated
on what its quantized predecessors really give it; unsupported models fall back, named."""
import copy
import os

import pytest
import torch
from torch import nn

from architectures import ARCHS, V
from glowq_fx import GlowQConfig, GlowQWarning, quantize_
from tests_helpers import tiny_llama, token_batches


def _both(model, batches, **config):
    """(the model quantized whole, its report, the model quantized block by block, its report)."""
    whole, blocks = copy.deepcopy(model), copy.deepcopy(model)
    cfg = dict(group_size=32, rank=8, **config)
    r_whole = quantize_(whole, batches, GlowQConfig(calibration="model", **cfg), progress=False)
    r_blocks = quantize_(blocks, batches, GlowQConfig(calibration="blocks", **cfg), progress=False)
    return whole, r_whole, blocks, r_blocks


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors that differ: {different[:5]}"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "falcon", "gptj", "novel"])
def test_float_fed_blocks_equal_the_whole_model_pass_bit_for_bit(arch, gen):
    torch.manual_seed(0)
    model = ARCHS[arch][0]().eval()
    ids = [torch.randint(0, V, (2, 12), generator=gen) for _ in range(3)]
    batches = ids if arch == "novel" else [{"input_ids": i} for i in ids]
    extra = {"quantize_output_head": True} if arch == "novel" else {}  # an untied head: the tail pass
    whole, r_whole, blocks, r_blocks = _both(model, batches, **extra)
    assert r_blocks.calibration["mode"] == "blocks" and r_whole.calibration["mode"] == "model"
    assert [g.name for g in r_blocks.groups] == [g.name for g in r_whole.groups]
    assert [(g.error_before, g.error_after) for g in r_blocks.groups] == [(g.error_before, g.error_after)
                                                                          for g in r_whole.groups]
    assert r_blocks.n_tokens == r_whole.n_tokens == 3 * 2 * 12
    if arch == "novel":
        assert "lm_head" in {g.name for g in r_blocks.groups}
    _assert_same_model(whole, blocks)


def test_padding_is_excluded_block_by_block_as_in_the_whole_model_pass(gen):
    batches = token_batches(2, seed=3)
    for b in batches:
        b["attention_mask"] = torch.ones_like(b["input_ids"])
    batches[1]["attention_mask"][0, 15:] = 0
    whole, r_whole, blocks, r_blocks = _both(tiny_llama(), batches)
    assert r_blocks.n_tokens == r_whole.n_tokens == 2 * 24 * 2 - 9
    _assert_same_model(whole, blocks)


def test_quantized_fed_block_sees_what_its_quantized_predecessor_gives(monkeypatch):
    """With block_inputs="quantized", each group's S is the one a whole-model pass over the final
    model collects: its inputs come from the quantized, corrected blocks before it."""
    import glowq_fx.quantize.api as quantize_module
    from glowq_fx.calibration.collect import collect_statistics
    from glowq_fx.capture.run import run_batch

    model, batches = tiny_llama(), token_batches(3)
    used = {}
    solve_group = quantize_module._quantize_group

    def spy(model, g, S, config):
        used[g.name] = S.clone()
        return solve_group(model, g, S, config)

    monkeypatch.setattr(quantize_module, "_quantize_group", spy)
    fed = copy.deepcopy(model)
    report = quantize_(fed, batches, GlowQConfig(group_size=32, rank=8, block_inputs="quantized"), progress=False)
    assert report.calibration["block_inputs"] == "quantized"
    # the first group of each block reads the block's input: the final model's, for every block
    # (inside a block the later groups are calibrated on the float block, as in the float-fed pass)
    firsts = [g for g in report.groups if g.name.endswith("self_attn.{q_proj,k_proj,v_proj}")]
    seen = collect_statistics(fed, firsts, batches, run_batch)  # the final model's block inputs
    assert len(firsts) == 2
    for g in firsts:
        assert torch.equal(used[g.name], seen[g.name].value()), g.name
    float_fed = copy.deepcopy(model)
    quantize_(float_fed, batches, GlowQConfig(group_size=32, rank=8), progress=False)
    first, second = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
    assert torch.equal(float_fed.get_submodule(first).A, fed.get_submodule(first).A)  # float inputs either way
    assert not torch.equal(float_fed.get_submodule(second).A, fed.get_submodule(second).A)  # other inputs


@pytest.mark.parametrize("place", ["device", "cpu", "disk"])
def test_every_place_for_the_cached_inputs_gives_the_same_model(place, tmp_path):
    model, batches = tiny_llama(), token_batches(2)
    reference = copy.deepcopy(model)
    quantize_(reference, batches, GlowQConfig(group_size=32, rank=8, calibration="model"), progress=False)
    offload = tmp_path / "activations"
    report = quantize_(model, batches, GlowQConfig(group_size=32, rank=8, activations=place, offload_dir=str(offload)),
                       progress=False)
    assert report.calibration["activations"] == place and report.calibration["activation_bytes"] > 0
    _assert_same_model(reference, model)
    if place == "disk":
        assert offload.is_dir() and not os.listdir(offload)  # the files are removed after


class Rescaled(nn.Module):
    """Its forward changes the hidden states between its blocks."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)) for _ in range(2))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x) * 0.5
        return x


class Between(Rescaled):
    """A linear outside the blocks runs between them, on a side branch."""

    def __init__(self):
        super().__init__()
        self.bridge = nn.Linear(32, 32)

    def forward(self, ids):
        x = self.blocks[0](self.embed(ids))
        side = self.bridge(x)
        return self.blocks[1](x) + side


@pytest.mark.parametrize("cls, why", [(Rescaled, "changes the hidden states between blocks.0 and blocks.1"),
                                      (Between, r"linears outside the blocks run between two blocks \(bridge\)")])
def test_models_that_cannot_go_block_by_block_are_calibrated_whole_and_say_why(cls, why, gen):
    torch.manual_seed(0)
    batches = [torch.randint(0, V, (2, 8), generator=gen) for _ in range(2)]
    model = cls().eval()
    reference = copy.deepcopy(model)
    with pytest.warns(GlowQWarning, match=f"calibrating {cls.__name__} whole, not block by block: .*{why}"):
        report = quantize_(model, batches, GlowQConfig(group_size=32, rank=4), progress=False)
    assert report.calibration == {"mode": "model"}
    quantize_(reference, batches, GlowQConfig(group_size=32, rank=4, calibration="model"), progress=False)
    _assert_same_model(reference, model)
    with pytest.raises(ValueError, match=f"calibration='blocks' is not possible for {cls.__name__}: .*{why}"):
        quantize_(cls().eval(), batches, GlowQConfig(group_size=32, rank=4, calibration="blocks"), progress=False)


def test_a_linear_before_the_blocks_is_calibrated_in_the_recording_pass(gen):
    class WithInput(Rescaled):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32)

        def forward(self, ids):
            x = self.proj(self.embed(ids))
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model = WithInput().eval()
    batches = [torch.randint(0, V, (2, 8), generator=gen) for _ in range(2)]
    whole, r_whole, blocks, r_blocks = _both(model, batches)
    assert r_blocks.calibration["mode"] == "blocks" and "proj" in {g.name for g in r_blocks.groups}
    _assert_same_model(whole, blocks)


def test_bad_calibration_choices_are_named():
    with pytest.raises(ValueError, match="has no list of repeated blocks"):
        quantize_(nn.Sequential(nn.Linear(8, 8)), [torch.randn(2, 8)], GlowQConfig(calibration="blocks"),
                  progress=False)
    with pytest.raises(ValueError, match="computes blocks away from the model"):
        quantize_(tiny_llama(), token_batches(1), GlowQConfig(calibration="model"), progress=False, device="meta")
    for field, bad in (("calibration", "layers"), ("block_inputs", "fp8"), ("activations", "gpu")):
        with pytest.raises(ValueError, match=f"unsupported {field}="):
            GlowQConfig(**{field: bad})


def test_a_block_with_a_forward_of_its_own_gets_it_back():
    """accelerate's offload hooks set a module's forward as an instance attribute: the stubs of
    the recording pass must put it back."""
    model = tiny_llama()
    layer = model.model.layers[1]
    calls = []
    original = layer.forward

    def own_forward(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.forward = own_forward
    quantize_(model, token_batches(1), GlowQConfig(group_size=32, rank=4), progress=False)
    assert layer.forward is own_forward and calls  # the block ran through it, block by block


def test_the_whole_model_capture_s_traces_are_collected_before_the_statistics(monkeypatch):
    """Calibrated whole, the graph capture leaves its traces (Dynamo's shape environment, fake
    tensors) in reference cycles, about a layer's worth of Python objects per layer; ``quantize_``
    collects them before the statistics' forwards instead of carrying them through their peak (for
    models of ``RELEASE_MIN_BYTES`` or more: a full collection costs up to a second)."""
    import gc

    import glowq_fx.quantize.api as quantize_module

    def traces() -> int:  # other tests' compiled models may hold some of their own: counted before
        return sum(type(o).__name__ in ("ShapeEnv", "FakeTensorMode") for o in gc.get_objects())

    alive = []
    collect = quantize_module.collect_statistics

    def counting(*args, **kwargs):
        alive.append(traces())
        return collect(*args, **kwargs)

    monkeypatch.setattr(quantize_module, "collect_statistics", counting)
    monkeypatch.setattr(quantize_module, "RELEASE_MIN_BYTES", 0)  # a tiny model stands for a large one
    model, batches = tiny_llama(), token_batches(2)
    gc.collect()
    gc.collect()
    before = traces()
    quantize_(model, batches, GlowQConfig(group_size=32, rank=4, calibration="model"), progress=False)
    assert alive == [before]


def _block_of(model, blocks):
    """``id(parameter)`` -> index of the block holding it."""
    return {id(p): i for i, name in enumerate(blocks) for p in model.get_submodule(name).parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon"])
def test_block_by_block_each_capture_traces_one_block_and_the_rest_none(arch, gen, monkeypatch):
    """Block by block the model is never traced whole: the part outside the blocks is captured with
    the blocks stubbed, then each block on its own cached input, at its turn (what the capture
    costs stays one block's, at any depth)."""
    import glowq_fx.capture.groups as groups_module

    torch.manual_seed(0)
    model = ARCHS[arch][0]().eval()
    from glowq_fx.capture.blocks import find_blocks

    blocks = find_blocks(model)
    block_of = _block_of(model, blocks.names)
    traced = []
    capture = groups_module.capture_graphs

    def spy(*args, **kwargs):
        pieces, breaks = capture(*args, **kwargs)
        traced.append({block_of[id(t)] for p in pieces for t in p.example_inputs if id(t) in block_of})
        return pieces, breaks

    monkeypatch.setattr(groups_module, "capture_graphs", spy)
    batches = [{"input_ids": torch.randint(0, V, (2, 12), generator=gen)}]
    report = quantize_(model, batches, GlowQConfig(group_size=32, rank=4), progress=False)
    assert report.calibration["mode"] == "blocks"
    assert traced == [set()] + [{i} for i in range(len(blocks.names))]


class Stacked(nn.Module):
    """An embedding, then its blocks in turn (subclasses make ``self.blocks``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 32)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return x


class Alternating(Stacked):
    """Blocks of one class whose data flow differs by position: in odd blocks ``v`` reads the block
    input itself, not its normalised copy (as layers that share or skip parts do)."""

    class Block(nn.Module):
        def __init__(self, odd: bool):
            super().__init__()
            self.odd = odd
            self.norm = nn.LayerNorm(32)
            self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))

        def forward(self, x):
            h = self.norm(x)
            return x + self.q(h) * self.k(h) + self.v(x if self.odd else h)

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(self.Block(i % 2 == 1) for i in range(4))


def test_blocks_of_one_class_with_their_own_data_flow_get_their_own_groups(gen):
    """Each block's groups come from its own graph, not from block 0's repeated: the odd blocks'
    ``v`` reads another input, so it is a group of its own there, as the whole-model capture says."""
    batches = [torch.randint(0, V, (2, 8), generator=gen) for _ in range(2)]
    whole, r_whole, blocks, r_blocks = _both(Alternating().eval(), batches)
    members = [g.members for g in r_blocks.groups]
    assert members == [g.members for g in r_whole.groups]
    assert ("blocks.0.q", "blocks.0.k", "blocks.0.v") in members
    assert ("blocks.1.q", "blocks.1.k") in members and ("blocks.1.v",) in members
    _assert_same_model(whole, blocks)


class SharedAcross(Stacked):
    """Blocks that call one linear module, registered in each, and one of their own."""

    class Block(nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.own, self.shared = nn.Linear(32, 32), shared

        def forward(self, x):
            return x + self.shared(self.own(x))

    def __init__(self):
        super().__init__()
        shared = nn.Linear(32, 32)
        self.blocks = nn.ModuleList(self.Block(shared) for _ in range(2))


def test_a_linear_shared_between_blocks_stays_in_floating_point_in_its_every_block(gen):
    """Its graph names it under both blocks: quantizing it in one would untie it, as the whole-model
    pass says too."""
    batches = [torch.randint(0, V, (2, 8), generator=gen) for _ in range(2)]
    whole, r_whole, blocks, r_blocks = _both(SharedAcross().eval(), batches)
    assert [g.members for g in r_blocks.groups] == [g.members for g in r_whole.groups] == [("blocks.0.own",),
                                                                                          ("blocks.1.own",)]
    assert "untie" in r_blocks.skipped["blocks.0.shared"] and "untie" in r_whole.skipped["blocks.0.shared"]
    assert isinstance(blocks.blocks[1].shared, nn.Linear) and blocks.blocks[0].shared is blocks.blocks[1].shared
    _assert_same_model(whole, blocks)


class Breaking(Stacked):
    """Every block breaks Dynamo's graph once, between its two linears."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            y = self.up(x)
            torch._dynamo.graph_break()
            return x + self.down(torch.relu(y))

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(self.Block() for _ in range(3))


def test_blocks_that_say_the_same_warn_once(gen, recwarn):
    batches = [torch.randint(0, V, (2, 8), generator=gen)]
    report = quantize_(Breaking().eval(), batches, GlowQConfig(group_size=32, rank=4), progress=False)
    assert report.calibration["mode"] == "blocks" and len(report.groups) == 6
    said = [str(w.message) for w in recwarn if "graph breaks" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("blocks.0 captured as 2 graphs"), said
    assert report.graph_breaks


class Borrowing(Stacked):
    """Its blocks call a linear of the model's own, outside every block (held unregistered)."""

    class Block(nn.Module):
        def __init__(self, borrowed):
            super().__init__()
            self.own = nn.Linear(32, 32)
            self.borrowed = [borrowed]  # a plain list: not a submodule of the block

        def forward(self, x):
            return x + self.borrowed[0](self.own(x))

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.blocks = nn.ModuleList(self.Block(self.proj) for _ in range(2))


def test_a_block_that_runs_a_linear_not_its_own_is_named_with_the_fix(gen):
    batches = [torch.randint(0, V, (2, 8), generator=gen)]
    with pytest.raises(ValueError, match=r"blocks.0 runs linears that are not its own \(proj\).*calibration='model'"):
        quantize_(Borrowing().eval(), batches, GlowQConfig(group_size=32, rank=4), progress=False)
    report = quantize_(Borrowing().eval(), batches, GlowQConfig(group_size=32, rank=4, calibration="model"),
                       progress=False)
    assert "proj" in {m for g in report.groups for m in g.members}


def test_first_position_weight_reaches_both_calibration_paths(monkeypatch):
    """The S each group is solved with: block by block equals whole-model with the weight, and the
    weight changes it (the first positions really counted more)."""
    import glowq_fx.quantize.api as quantize_module

    model, batches = tiny_llama(), token_batches(2)
    used: dict[str, dict[str, torch.Tensor]] = {}
    solve_group = quantize_module._quantize_group

    def spy(tag):
        def record(model, g, S, config):
            used.setdefault(tag, {})[g.name] = S.clone()
            return solve_group(model, g, S, config)
        return record

    for tag, options in [("blocks", dict(calibration="blocks", first_position_weight=16.0)),
                         ("model", dict(calibration="model", first_position_weight=16.0)),
                         ("plain", dict(calibration="model"))]:
        monkeypatch.setattr(quantize_module, "_quantize_group", spy(tag))
        quantize_(copy.deepcopy(model), batches, GlowQConfig(group_size=32, rank=8, **options), progress=False)
    assert used["blocks"].keys() == used["model"].keys() == used["plain"].keys()
    for name in used["model"]:
        torch.testing.assert_close(used["blocks"][name], used["model"][name], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(used["model"][name], used["plain"][name]), name
