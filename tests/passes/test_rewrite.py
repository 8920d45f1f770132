"""passes.rewrite on ops it has never heard of: the pass knows the quantized ops only through the
``QuantizedOps`` its caller names, so ops defined here (plain dense weights standing in for packed
ones) are rewritten as the backend's ``glowq::`` ops are: one projection per group, one group node."""
import operator
from typing import Optional

import torch
from torch import Tensor, nn
from torch.library import custom_op

from passes.rewrite import QuantizedOps, fuse_shared_projections


@custom_op("rewrite_test::linear", mutates_args=())
def _linear(x: Tensor, weight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor], A: Optional[Tensor],
            R: Optional[Tensor]) -> Tensor:
    y = x @ weight * scales - zeros  # weight (K, N): the packed weight's last dimension is N
    y = y if bias is None else y + bias
    return y if A is None else y + R @ A.T


@_linear.register_fake
def _(x, weight, scales, zeros, bias, A, R):
    return x.new_empty(*x.shape[:-1], weight.shape[-1])


@custom_op("rewrite_test::projection", mutates_args=())
def _projection(x: Tensor, B: Tensor) -> Tensor:
    return x @ B.T


@_projection.register_fake
def _(x, B):
    return x.new_empty(*x.shape[:-1], B.shape[0])


@custom_op("rewrite_test::group", mutates_args=())
def _group(x: Tensor, weights: list[Tensor], scales: list[Tensor], zeros: list[Tensor], biases: list[Optional[Tensor]],
           As: list[Optional[Tensor]], R: Optional[Tensor]) -> list[Tensor]:
    return [_linear(x, *args, R) for args in zip(weights, scales, zeros, biases, As)]


@_group.register_fake
def _(x, weights, scales, zeros, biases, As, R):
    return [x.new_empty(*x.shape[:-1], w.shape[-1]) for w in weights]


@custom_op("rewrite_test::projected_group", mutates_args=())
def _projected_group(x: Tensor, weights: list[Tensor], scales: list[Tensor], zeros: list[Tensor],
                     biases: list[Optional[Tensor]], As: list[Tensor], B: Tensor) -> list[Tensor]:
    return _group(x, weights, scales, zeros, biases, As, _projection(x, B))


@_projected_group.register_fake
def _(x, weights, scales, zeros, biases, As, B):
    return [x.new_empty(*x.shape[:-1], w.shape[-1]) for w in weights]


OPS = QuantizedOps(linear=torch.ops.rewrite_test.linear.default, projection=torch.ops.rewrite_test.projection.default,
                   group=torch.ops.rewrite_test.group.default,
                   projected_group=torch.ops.rewrite_test.projected_group.default)


class Member(nn.Module):
    def __init__(self, K, N, B, gen, corrected=True):
        super().__init__()
        self.register_buffer("weight", torch.randn(K, N, generator=gen))
        self.register_buffer("scales", torch.rand(N, generator=gen) + 0.5)
        self.register_buffer("zeros", torch.randn(N, generator=gen))
        self.register_buffer("A", torch.randn(N, B.shape[0], generator=gen) if corrected else None)
        self.B = B  # the group's, shared by reference

    def forward(self, x):
        R = None if self.A is None else _projection(x, self.B)
        return _linear(x, self.weight, self.scales, self.zeros, None, self.A, R)


class Block(nn.Module):
    """Three members read one input through a norm; a fourth reads the output of the first."""

    def __init__(self, gen):
        super().__init__()
        self.register_buffer("B", torch.randn(4, 16, generator=gen))
        self.q, self.k, self.v = (Member(16, n, self.B, gen) for n in (16, 8, 8))
        self.o = Member(16, 16, torch.randn(4, 16, generator=gen), gen, corrected=False)

    def forward(self, x):
        h = torch.nn.functional.layer_norm(x, (16,))
        return self.o(self.q(h) + torch.cat([self.k(h), self.v(h)], -1))


def test_the_rewrite_runs_on_ops_its_caller_names(gen):
    block = Block(gen)
    x = torch.randn(3, 5, 16, generator=gen)
    reports = []

    def backend(gm, example_inputs):
        reports.append((fuse_shared_projections(gm, example_inputs, ops=OPS), gm))
        return gm.forward

    compiled = torch.compile(block, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)
    (report, gm), = reports
    nodes = list(gm.graph.nodes)
    assert report.projections_before == 3 and report.projections_after == 1
    assert sum(n.target is OPS.projection for n in nodes) == 1
    (group,) = [n for n in nodes if n.target is OPS.group]
    assert len(group.args[1]) == 3 and report.linears_fused == 3
    assert sum(n.target is operator.getitem and n.args[0] is group for n in nodes) == 3
    assert sum(n.target is OPS.linear for n in nodes) == 1  # o reads another input: left as it was


def test_a_graph_without_the_named_ops_comes_out_unchanged(gen):
    lin = nn.Linear(8, 8)
    seen = []

    def backend(gm, example_inputs):
        before = str(gm.graph)
        report = fuse_shared_projections(gm, example_inputs, ops=OPS)
        seen.append((before == str(gm.graph), report.groups))
        return gm.forward

    torch.compile(lin, backend=backend)(torch.randn(2, 8, generator=gen))
    assert seen == [(True, [])]


class TwoViews(nn.Module):
    """One group whose members read its input through two views (the projection is shared with a
    reshape, so two nodes read it), and one group read by a single node."""

    def __init__(self, gen):
        super().__init__()
        self.register_buffer("B", torch.randn(4, 16, generator=gen))
        self.a, self.b = Member(16, 8, self.B, gen), Member(16, 8, self.B, gen)
        self.register_buffer("B2", torch.randn(3, 8, generator=gen))
        self.c, self.d = Member(8, 8, self.B2, gen), Member(8, 4, self.B2, gen)

    def forward(self, x):
        h = torch.nn.functional.layer_norm(x, (16,))
        y = self.a(h) + self.b(h.reshape(-1, 16)).reshape(h.shape[:-1] + (8,))
        return torch.cat([self.c(y), self.d(y)], -1)


def test_absorbing_moves_a_projection_into_the_one_group_node_that_reads_it(gen):
    model = TwoViews(gen)
    x = torch.randn(2, 3, 16, generator=gen)
    reports = []

    def backend(gm, example_inputs):
        reports.append((fuse_shared_projections(gm, example_inputs, ops=OPS, absorb=True), gm))
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    (report, gm), = reports
    nodes = list(gm.graph.nodes)
    (made,) = [n for n in nodes if n.target is OPS.projected_group]
    assert made.args[6].target != OPS.projection and len(made.args[1]) == 2  # c and d: B2 itself
    assert report.absorbed == 1 and "made in" in str(report)
    # a and b read two views: their projection has two readers and stays a node of its own
    assert sum(n.target is OPS.projection for n in nodes) == 1
    assert report.projections_before == 4 and report.projections_after == 2


def test_absorbing_needs_the_op_to_emit(gen):
    import pytest

    ops = QuantizedOps(linear=OPS.linear, projection=OPS.projection, group=OPS.group)
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="projected_group"):
        fuse_shared_projections(gm, [], ops=ops, absorb=True)


class KeywordMember(Member):
    """A member whose call passes the weights, ``A`` and ``R`` (and the projection's ``B``) by keyword."""

    def forward(self, x):
        R = None if self.A is None else _projection(x, B=self.B)
        return _linear(x, weight=self.weight, scales=self.scales, zeros=self.zeros, bias=None, A=self.A, R=R)


def test_the_rewrite_reads_arguments_by_name_whether_passed_by_position_or_keyword(gen):
    block = Block(gen)
    block.q.__class__ = block.k.__class__ = KeywordMember  # v keeps positional arguments
    x = torch.randn(2, 3, 16, generator=gen)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        report = fuse_shared_projections(gm, example_inputs, ops=OPS)
        graphs.append(report)
        return gm.forward

    compiled = torch.compile(block, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)
    gm, report = graphs
    assert any(n.kwargs.get("R") is not None for n in gm.graph.nodes if n.target is OPS.linear) or \
        report.linears_fused == 3  # the traced graph kept some keywords, or they were bound and fused
    assert report.projections_after == 1 and report.linears_fused == 3
