"""One call of our CPU GEMV per group of linears reading one input (a graph pass, CPU only).

After the rewrite, each 4-bit linear converted for our CPU GEMV (``kernels.cpu_gemv``) is its own
``glowq::w4a16_linear_int4pack`` node, the members of a group sharing one input ``x`` and one
``R = x B^T`` node. At a decode step each call costs some microseconds beyond its arithmetic (the
call from the generated code, the activations' rounding, a parallel region), and SmolLM2 makes
330 of them per token. ``merge_gemv_members`` replaces the members that read the same ``x`` and
``R`` by one node (``gemv_group``): one call that rounds the activations once, makes ``R`` itself
from ``B`` when no one else reads it, and runs every member with its bias and correction
(``torch.ops.glowq_cpu.w4a16_gemv_group``). Prefill rows go through each member's own path.
Linears converted for PyTorch's int4 kernel are left as they are.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from glowq_fx import ops
from glowq_fx.kernels import cpu_gemv, cpu_int4
from glowq_fx.kernels.layout import group_size_of
from passes.grouping import positional_arguments


def gemv_group(x, qweights, scales, zeros, biases, As, packs, params, R, B):
    """The members' outputs (``w4a16_linear_int4pack`` each), ``R`` given or made from ``B``."""
    if not cpu_gemv.serves(x):  # prefill rows (or a dtype the GEMV does not take): member by member
        R = ops.projection_product(x, B) if B is not None else R
        return [ops.int4pack_linear(x, q, s, z, b, A, R, p, sz)
                for q, s, z, b, A, p, sz in zip(qweights, scales, zeros, biases, As, packs, params)]
    return cpu_gemv.group_matmul(x, packs, params, [group_size_of(q, s) for q, s in zip(qweights, scales)], biases,
                                 As, R, B)


def _value(node):
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None


def _ours(node: fx.Node) -> bool:
    params = _value(positional_arguments(node)[8])
    return isinstance(params, torch.Tensor) and cpu_int4.kernel_of(params) == "glowq"


def _defined_before(arg, anchor: fx.Node, order: dict) -> bool:
    """True when ``arg`` (a node or a list of them) is available at ``anchor``; a ``get_attr``
    (no inputs) defined later is moved up."""
    if isinstance(arg, (list, tuple)):
        return all(_defined_before(a, anchor, order) for a in arg)
    if not isinstance(arg, fx.Node) or order[arg] < order[anchor]:
        return True
    if arg.op == "get_attr":
        anchor.prepend(arg)
        order[arg] = order[anchor] - 0.5
        return True
    return False


def merge_gemv_members(gm: fx.GraphModule) -> int:
    """Replace the GEMV members reading the same ``x`` and ``R`` by one ``gemv_group`` node each
    (in place). Returns how many groups were made."""
    linear = torch.ops.glowq.w4a16_linear_int4pack.default
    projection = torch.ops.glowq.shared_projection.default
    members: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is linear and _ours(node):
            x, *_, R = positional_arguments(node)[:7]
            members.setdefault((x, R), []).append(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    made = 0
    for (x, R), nodes in members.items():
        takes_B = isinstance(R, fx.Node) and R.target is projection and set(R.users) <= set(nodes)
        if len(nodes) < 2 and not takes_B:
            continue
        args = [positional_arguments(n) for n in nodes]
        columns = [[a[i] for a in args] for i in (1, 2, 3, 4, 5, 7, 8)]  # qweights ... params
        anchor = nodes[0]
        B = positional_arguments(R)[1] if takes_B else None
        if not _defined_before([*columns, B], anchor, order):
            continue
        with gm.graph.inserting_before(anchor):
            group = gm.graph.call_function(gemv_group, (x, *columns, None if takes_B else R, B))
            for i, node in enumerate(nodes):
                item = gm.graph.call_function(operator.getitem, (group, i))
                item.meta = dict(node.meta)
                node.replace_all_uses_with(item)
        for node in nodes:
            gm.graph.erase_node(node)
        if takes_B and not R.users:
            gm.graph.erase_node(R)
        made += 1
    if made:
        gm.graph.lint()
        gm.recompile()
    return made
