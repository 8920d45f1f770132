"""passes.grouping on the three graph flavours: Dynamo, AOTAutograd (aten) and call_module."""
import operator

import networkx as nx
import pytest
import torch
import transformers as T
from torch import fx, nn
from torch._functorch.aot_autograd import aot_module_simplified

from passes.grouping import CapturedGraph, find_input_sharing_groups
from passes.groups import GroupFilter
from tests_helpers import tiny_llama_config


class Block(nn.Module):
    """p1..p3 read one normalized tensor (p2 through a reshape), p4 through a dtype cast;
    p5 reads a view that changes the row width, p6 a slice of the rows: neither shares."""

    def __init__(self, d=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.p1, self.p2, self.p3, self.p4 = nn.Linear(d, 48), nn.Linear(d, 40), nn.Linear(d, 36), nn.Linear(d, 44)
        self.p5 = nn.Linear(d // 2, 8)
        self.p6 = nn.Linear(d, 12)

    def forward(self, x):
        h = self.norm(x)
        b, t, d = h.shape
        return (self.p1(h).sum(-1) + self.p2(h.reshape(b * t, d)).view(b, t, -1).sum(-1) + self.p3(h).sum(-1)
                + self.p4(h.to(torch.float32)).sum(-1) + self.p5(h.view(b, t * 2, d // 2)).view(b, t, -1).sum(-1)
                + self.p6(h[:, -1:]).sum(-1))


def _dynamo(model, *args):
    captured = []

    def backend(gm, example_inputs, **_):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(*args)
    assert len(captured) == 1
    return captured[0]


def _aten(model, *args):
    captured = []

    def backend(gm, example_inputs, **_):
        real = list(example_inputs)  # the inner compiler sees fakes; placeholders keep the order

        def inner(g, _fake):
            captured.append((g, real))
            return g.forward

        return aot_module_simplified(gm, example_inputs, fw_compiler=inner)

    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(*args)
    return captured[0]


EXPECTED_BLOCK = ["{p1,p2,p3,p4}", "p5", "p6"]


@pytest.mark.parametrize("flavour", ["dynamo", "aten"])
def test_block_groups_through_views_and_casts(flavour, gen):
    model = Block().eval()
    x = torch.randn(2, 5, 32, generator=gen)
    gm, ex = (_dynamo if flavour == "dynamo" else _aten)(model, x)
    analysis = find_input_sharing_groups(gm, ex, model=model)
    assert [g.name for g in analysis.groups] == EXPECTED_BLOCK
    first = analysis.groups[0]
    assert first.in_features == 32 and first.out_features == (48, 40, 36, 44)
    assert analysis.groups[1].in_features == 16
    # the networkx structure: one producer feeding p1..p4, edges tell what was looked through
    graph = analysis.graph
    assert isinstance(graph, nx.DiGraph)
    producer = next(iter(graph.predecessors("p1")))
    assert set(graph.successors(producer)) == {"p1", "p2", "p3", "p4"}
    if flavour == "dynamo":
        assert graph.edges[producer, "p2"]["through"] == ("reshape",)
        assert graph.edges[producer, "p4"]["through"] == ("to",)


def test_call_module_graph():
    model = Block().eval()
    gm = fx.symbolic_trace(model)
    analysis = find_input_sharing_groups(gm)  # module names come from the graph module itself
    # without shape metadata views are trusted, so p5's width-changing view is caught only by
    # in_features: it must still not join p1..p4
    names = [g.name for g in analysis.groups]
    assert names[0] == "{p1,p2,p3,p4}"
    assert "p6" in names


def _tiny_llama():
    return T.LlamaForCausalLM(tiny_llama_config()).eval()


def _tiny_gpt2():
    config = T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_gpt2], ids=["llama", "gpt2"])
def test_aten_graph_gives_the_dynamo_groups(build):
    """After AOTAutograd linears are t + mm (Llama) or addmm on an (in, out) weight (Conv1D),
    each consumer with its own view of the input: the same groups must come out."""
    model = build()
    ids = torch.randint(0, 128, (2, 8))

    def forward(m, i):
        return m(input_ids=i, use_cache=False).logits

    dyn = find_input_sharing_groups(*_dynamo(lambda i: forward(model, i), ids), model=model)
    aot = find_input_sharing_groups(*_aten(lambda i: forward(model, i), ids), model=model)
    assert [g.name for g in aot.groups] == [g.name for g in dyn.groups]
    assert [g.out_features for g in aot.groups] == [g.out_features for g in dyn.groups]
    forms = {s.form for sites in aot.sites.values() for s in sites}
    assert forms <= {"mm", "addmm"}
    if build is _tiny_gpt2:
        site = aot.sites["transformer.h.0.attn.c_attn"][0]
        assert site.stored_transposed and (site.in_features, site.out_features) == (64, 192)
        # lm_head is tied to wte: never grouped
        assert "tied to the embedding transformer.wte" in dyn.skipped["lm_head"]


def test_groups_are_deterministic():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 6))
    runs = [find_input_sharing_groups(*_dynamo(lambda i: model(input_ids=i).logits, ids), model=model).groups
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0][0].members == tuple(f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj"))


def test_filters():
    model = _tiny_llama()
    gm, ex = _dynamo(lambda i: model(input_ids=i).logits, torch.randint(0, 128, (1, 6)))
    f = GroupFilter(skip={"lm_head": "head"}, exclude=(r"\.v_proj$",), min_out_features=40)
    analysis = find_input_sharing_groups(gm, ex, model=model, filter=f)
    names = [g.name for g in analysis.groups]
    assert names[0] == "model.layers.0.self_attn.q_proj"  # k_proj (N=32 < 40) and v_proj are out
    assert analysis.skipped["lm_head"] == "head"
    assert "exclude pattern" in analysis.skipped["model.layers.0.self_attn.v_proj"]
    assert "min_out_features 40" in analysis.skipped["model.layers.0.self_attn.k_proj"]
    only_mlp = find_input_sharing_groups(gm, ex, model=model, filter=GroupFilter(include=(r"\.mlp\.",)))
    assert all(".mlp." in m for g in only_mlp.groups for m in g.members)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.shared = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        y = torch.relu(x)
        return self.a(x) + self.shared(x) + self.b(y) + self.shared(y)


def test_module_reading_two_inputs_gets_its_own_group(gen):
    model = CalledTwice()
    gm, ex = _dynamo(model, torch.randn(3, 16, generator=gen))
    analysis = find_input_sharing_groups(gm, ex, model=model)
    assert [g.name for g in analysis.groups] == ["a", "shared", "b"]
    assert any("shared reads 2 different inputs" in n for n in analysis.notes)


def test_placeholder_weights_need_example_inputs(gen):
    model = Block().eval()
    gm, _ = _dynamo(model, torch.randn(2, 5, 32, generator=gen))
    with pytest.raises(ValueError, match="pass example_inputs"):
        find_input_sharing_groups(gm, model=model)
    with pytest.raises(ValueError, match="no graph to analyse"):
        find_input_sharing_groups([])


class TwoPieces(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.p1, self.p2 = nn.LayerNorm(16), nn.Linear(16, 24), nn.Linear(16, 20)


class Piece0(nn.Module):  # h = norm(x); returns p1(h) and h (a graph break follows)
    def __init__(self, m):
        super().__init__()
        self.norm, self.p1 = m.norm, m.p1

    def forward(self, x):
        h = self.norm(x)
        return self.p1(h), h


class Piece1(nn.Module):  # resumes with h as an input
    def __init__(self, m):
        super().__init__()
        self.p2 = m.p2

    def forward(self, h):
        return self.p2(h)


def test_pieces_are_stitched_through_aliases():
    model = TwoPieces()
    g0, g1 = fx.symbolic_trace(Piece0(model)), fx.symbolic_trace(Piece1(model))
    apart = find_input_sharing_groups([CapturedGraph(g0), CapturedGraph(g1)], model=model)
    assert [g.name for g in apart.groups] == ["p1", "p2"]
    stitched = [CapturedGraph(g0), CapturedGraph(g1, aliases={"h": (0, "norm")})]
    assert [g.name for g in find_input_sharing_groups(stitched, model=model).groups] == ["{p1,p2}"]


def test_activation_products_are_not_linears(gen):
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return operator.matmul(self.q(x), self.k(x).transpose(-1, -2))

    model = Attn()
    analysis = find_input_sharing_groups(*_dynamo(model, torch.randn(4, 16, generator=gen)), model=model)
    assert [g.name for g in analysis.groups] == ["{q,k}"] and not analysis.skipped
