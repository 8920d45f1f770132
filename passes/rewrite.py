"""Rewrite: one shared projection per group, and each group's members in one fused node.

A model that ``quantize_`` prepared reaches the backend as, per member ``i`` of a group::

    R_i = glowq.shared_projection(x, B)          # every member projects x again
    y_i = glowq.w4a16_linear(x, qweight_i, scales_i, zeros_i, bias_i, A_i, R_i)

This pass finds the members that read one input (``passes.grouping``, which also looks through
views and casts) and use one ``B``, keeps a single ``shared_projection`` node for them, and
replaces their linears by one ``glowq.w4a16_group`` node (one launch reads ``x`` for every
member) followed by a ``getitem`` per member::

    R = glowq.shared_projection(x, B)
    ys = glowq.w4a16_group(x, [qweight_i], [scales_i], [zeros_i], [bias_i], [A_i], R)
    y_i = ys[i]

Members that read the input through different views (a reshape, a cast) still share the one
projection: ``R`` is reshaped like their view (``rows_like``) when no op on either path can
reorder rows; otherwise they keep their own projection, and the report says so.
Members are fused into one group node only when they read the very same ``x`` node and all
their weights are defined before the first member (true for parameters and buffers, which are
graph inputs); the others keep their own node, and the report says why. The pass does not touch
any other node; an unquantized graph comes out unchanged.

The pass knows the ops only by their call signatures: the caller names them (``QuantizedOps``;
``glowq_fx.backend`` passes the ``glowq::`` ops), so this package never imports the library.
"""
from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from passes.grouping import find_input_sharing_groups, positional_arguments
from passes.groups import GroupFilter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedOps:
    """The call targets the rewrite reads and writes.

    Attributes:
        linear: ``linear(x, packed_weight, scales, zeros, bias, A, R) -> y``, one quantized linear.
        projection: ``projection(x, B) -> R``, a group's shared projection.
        group: ``group(x, [packed_weight], [scales], [zeros], [bias], [A], R) -> [y]``, the
            members of a group in one launch (members may differ in group size, bias and A).
        projected_group: ``projected_group(x, [packed_weight], [scales], [zeros], [bias], [A], B)
            -> [y]``, a group node that makes its ``R`` itself (optional: see ``absorb``).
        unfused_linear: ``linear``'s arguments followed by others (a copy of the weight in a
            device kernel's own layout): a linear whose projection the pass shares with its
            group but which keeps its own node (optional).
    """

    linear: object
    projection: object
    group: object
    projected_group: object = None
    unfused_linear: object = None

    @property
    def linears(self) -> frozenset:
        return frozenset(t for t in (self.linear, self.unfused_linear) if t is not None)


@dataclass(frozen=True)
class FusedGroup:
    """One rewritten group.

    Attributes:
        members: qualified module names, in launch order.
        x: name of the input node they read.
        projection: name of the kept ``shared_projection`` node, or None (no correction).
        node: name of the ``w4a16_group`` node (None for a lone member, left as it was).
    """

    members: tuple[str, ...]
    x: str
    projection: str | None
    node: str | None


@dataclass
class RewriteReport:
    """What ``fuse_shared_projections`` did.

    Attributes:
        groups: the rewritten groups, in graph order.
        projections_before, projections_after: projections the graph computes: ``shared_projection``
            nodes, and after the rewrite also the group nodes that make their own ``R``.
        linears_fused: ``w4a16_linear`` nodes replaced by group nodes.
        absorbed: projections moved into the one group node that reads them.
        left: module -> why it was not fused with its input-sharing group.
    """

    groups: list[FusedGroup] = field(default_factory=list)
    projections_before: int = 0
    projections_after: int = 0
    linears_fused: int = 0
    absorbed: int = 0
    left: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"glowq rewrite: {len(self.groups)} groups, shared projections {self.projections_before} -> "
                 f"{self.projections_after}, {self.linears_fused} linears fused into "
                 f"{sum(g.node is not None for g in self.groups)} group nodes"
                 + (f", {self.absorbed} projections made inside their group node" if self.absorbed else "")]
        for g in self.groups:
            lines.append(f"  {g.node or '(single)'}: {list(g.members)} read {g.x}, R = {g.projection}")
        lines += [f"  not fused: {m}: {why}" for m, why in self.left.items()]
        return "\n".join(lines)


# the ops' parameters, in the order of ``QuantizedOps``' signatures (their own names may differ)
LINEAR_PARAMS = ("x", "qweight", "scales", "zeros", "bias", "A", "R")
GROUP_PARAMS = ("x", "qweights", "scales", "zeros", "biases", "As", "R")
PROJECTION_PARAMS = ("x", "B")
WEIGHT_PARAMS = LINEAR_PARAMS[1:6]  # what a member brings to its group node


def arguments(node: fx.Node, params: tuple[str, ...]) -> dict:
    """``node``'s arguments by the contract's parameter names, however the call passed them."""
    bound = dict.fromkeys(params)
    bound.update(zip(params, positional_arguments(node)))
    return bound


def _r_of(node: fx.Node) -> fx.Node | None:
    """The ``R`` argument of a linear node."""
    return arguments(node, LINEAR_PARAMS)["R"]


def _b_of(R: fx.Node | None, ops: QuantizedOps) -> fx.Node | None:
    """The ``B`` node of ``R`` when ``R`` is a ``shared_projection`` (else None)."""
    if isinstance(R, fx.Node) and R.op == "call_function" and R.target is ops.projection:
        return arguments(R, PROJECTION_PARAMS)["B"]
    return None


def fuse_shared_projections(
    gm: fx.GraphModule,
    example_inputs: Sequence[object] = (),
    *,
    ops: QuantizedOps,
    model: nn.Module | None = None,
    absorb: bool = False,
) -> RewriteReport:
    """Rewrite ``gm`` in place (see the module docstring) and return what changed.

    Args:
        gm: a Dynamo graph (``glowq::`` op nodes, weights as placeholders or attributes).
        example_inputs: the real tensors bound to its placeholders (Dynamo's), to name members.
        ops: the quantized ops to find and the group op to emit.
        model: the module whose names the report uses (default: ``gm``).
        absorb: replace each group node whose ``R`` is a projection that it alone reads, of its
            own ``x``, by one ``ops.projected_group`` node that makes ``R`` itself (the launch can
            then make ``R`` inside the group's; needs ``ops.projected_group``).
    """
    if absorb and ops.projected_group is None:
        raise ValueError("absorb=True needs QuantizedOps.projected_group")
    graph = gm.graph
    report = RewriteReport(projections_before=sum(n.target is ops.projection for n in graph.nodes))
    if not any(n.target in ops.linears for n in graph.nodes):
        report.projections_after = report.projections_before
        return report
    analysis = find_input_sharing_groups(gm, example_inputs, model=model, filter=GroupFilter(),
                                         packed_linears=ops.linears)
    position = {n: i for i, n in enumerate(graph.nodes)}

    for group in analysis.groups:
        sites = [s for m in group.members for s in analysis.sites[m] if s.form == "packed"]
        sites.sort(key=lambda s: position[s.node])
        _share_projections(graph, sites, report, ops)
        # members fused together: same op, same input node, same R (or none)
        parts: dict[tuple, list] = {}
        for s in sites:
            member = arguments(s.node, LINEAR_PARAMS)
            parts.setdefault((s.node.target, member["x"], member["R"]), []).append(s)
        for (target, x, R), part in parts.items():
            if target is ops.linear:
                _rewrite_part(graph, part, x, R, position, report, ops)
            else:  # keeps its node; its R is the group's (above)
                report.groups.append(FusedGroup(tuple(s.module for s in part), x.name,
                                                None if R is None else R.name, None))
            if len(parts) > 1:
                for s in part:
                    report.left.setdefault(s.module, f"not in one launch with all of {group.name}: reads node "
                                           f"{x.name}, R = {None if R is None else R.name}")

    for node in list(graph.nodes):  # projections no member reads any more
        if node.target is ops.projection and not node.users:
            graph.erase_node(node)
    if absorb:
        _absorb_projections(graph, report, ops)
    graph.lint()
    gm.recompile()
    report.projections_after = sum(n.target is ops.projection or (ops.projected_group is not None and
                                                                  n.target is ops.projected_group)
                                   for n in graph.nodes)
    log.info("%s", report)
    return report


# ops between a group's producer and a member's input that keep the rows in their order, so
# that R of one view is R of another after the same reshape
_ORDER_KEEPING = {"view", "reshape", "_unsafe_view", "contiguous", "flatten", "to", "float", "half", "bfloat16",
                  "double", "type", "type_as", "detach", "clone", "alias", "_to_copy", "convert_element_type"}


def rows_like(R: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``R`` (the projection of another view of ``x``'s rows) shaped and typed like ``x``'s rows."""
    return R.reshape(*x.shape[:-1], R.shape[-1]).to(x.dtype)


def _share_projections(graph: fx.Graph, sites: list, report: RewriteReport, ops: QuantizedOps) -> None:
    """Point every member's R at the first projection of its ``B`` in the group (reshaped once
    per other view of the input)."""
    anchors: dict[fx.Node, tuple] = {}  # B node -> (R node, its site)
    reshaped: dict[tuple[fx.Node, fx.Node], fx.Node] = {}  # (R, view of x) -> rows_like node
    for s in sites:
        R = _r_of(s.node)
        B = _b_of(R, ops)
        if B is None:
            continue
        if B not in anchors:
            anchors[B] = (R, s)
            continue
        R0, s0 = anchors[B]
        x = arguments(s.node, LINEAR_PARAMS)["x"]
        if R is R0:
            continue
        if x is arguments(R0, PROJECTION_PARAMS)["x"]:
            s.node.replace_input_with(R, R0)
        elif set(s.through) <= _ORDER_KEEPING and set(s0.through) <= _ORDER_KEEPING:
            if (R0, x) not in reshaped:
                with graph.inserting_before(s.node):
                    reshaped[R0, x] = graph.call_function(rows_like, (R0, x))
            s.node.replace_input_with(R, reshaped[R0, x])
        else:
            report.left[s.module] = (f"reads its input through {list(s.through)}, which may reorder rows: it "
                                     "keeps its own projection")


def _absorb_projections(graph: fx.Graph, report: RewriteReport, ops: QuantizedOps) -> None:
    """Group nodes whose ``R`` is a projection of their own ``x`` that nothing else reads become
    ``projected_group`` nodes taking ``B``; the projection node goes."""
    renamed = {}
    for node in list(graph.nodes):
        if node.target is not ops.group:
            continue
        group = arguments(node, GROUP_PARAMS)
        R = group["R"]
        B = _b_of(R, ops)
        if (B is None or arguments(R, PROJECTION_PARAMS)["x"] is not group["x"] or len(R.users) != 1
                or any(a is None for a in group["As"])):
            continue
        with graph.inserting_before(node):
            made = graph.call_function(ops.projected_group, (*(group[p] for p in GROUP_PARAMS[:-1]), B))
        node.replace_all_uses_with(made)
        graph.erase_node(node)
        graph.erase_node(R)
        renamed[node.name] = made.name
        report.absorbed += 1
    report.groups = [FusedGroup(g.members, g.x, f"made in {renamed[g.node]}", renamed[g.node])
                     if g.node in renamed else g for g in report.groups]


def _rewrite_part(graph: fx.Graph, part: list, x: fx.Node, R, position, report: RewriteReport,
                  ops: QuantizedOps) -> None:
    first = part[0].node
    # a member whose weights are computed after the first member cannot move up to it
    weights = [[arguments(s.node, LINEAR_PARAMS)[p] for p in WEIGHT_PARAMS] for s in part]
    movable = [all(not isinstance(a, fx.Node) or position[a] < position[first] for a in w) for w in weights]
    fusable = [s for s, ok in zip(part, movable) if ok]
    for s in part:
        if s not in fusable:
            report.left[s.module] = "its weights are computed inside the graph after the group's first member"
    members = tuple(s.module for s in fusable)
    if len(fusable) < 2:
        report.groups.append(FusedGroup(tuple(s.module for s in part), x.name, None if R is None else R.name, None))
        return
    args = [list(column) for column in zip(*(w for w, ok in zip(weights, movable) if ok))]  # one list per parameter
    with graph.inserting_before(first):
        fused = graph.call_function(ops.group, (x, *args, R))
    for i, s in enumerate(fusable):
        with graph.inserting_after(fused):
            out = graph.call_function(operator.getitem, (fused, i))
        s.node.replace_all_uses_with(out)
        graph.erase_node(s.node)
    report.linears_fused += len(fusable)
    report.groups.append(FusedGroup(members, x.name, None if R is None else R.name, fused.name))

