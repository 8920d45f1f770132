"""Find the linears that read one input, from an FX graph, for any architecture.

GlowQ shares one right factor ``B`` among the linears that read the same input (q/k/v after
one norm, gate/up, GPT-J's q/k/v *and* ``fc_in``, Falcon's fused qkv *and* MLP input). The
paper's code hard-codes these groups by module-name suffix; this pass reads them off the
graph instead, so a new architecture needs no config.

What the pass sees as a linear (``y = x W^T (+ b)`` with ``W`` a 2-D parameter):

- ``torch._C._nn.linear`` / ``F.linear`` / ``aten.linear`` (Dynamo's form of ``nn.Linear``);
- ``call_module`` of a module with a 2-D ``weight`` (``torch.fx.symbolic_trace`` graphs);
- ``mm`` / ``addmm`` / ``matmul`` whose weight operand is a parameter, possibly transposed:
  transposed means ``W`` is stored (out, in) like ``nn.Linear`` (AOTAutograd's ``t`` + ``mm``);
  not transposed means (in, out), transformers' ``Conv1D``;
- a packed linear op the caller names (``packed_linears``; the backend names
  ``glowq::w4a16_linear``), called as ``op(x, packed_weight, ...)``: the packed weight is a
  buffer whose last dimension is ``out_features``, and ``in_features`` is the width of ``x``
  (read from the node's shape metadata; how the codes are packed is the caller's business).

Each linear's input is traced back through row-preserving ops (views, reshapes that keep the
last dimension, ``contiguous``, dtype casts, ``detach``, eval-mode dropout) to its real
producer; linears with the same producer form a group. Across graph breaks, a captured
piece's input may be declared an alias of an earlier piece's node (``CapturedGraph.aliases``)
so that groups are not cut by the break. The sharing structure is a networkx graph
``producer -> module``; groups come out in graph order, deterministically.

A module that reads two different inputs (called twice) cannot share one ``B`` with either
set of readers: it becomes a group of its own (its ``S`` then covers all its inputs).
"""
from __future__ import annotations

import inspect
import logging
import operator
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from passes._dynamo import placeholder_fqn
from passes.groups import GroupFilter, InputGroup, group_name

log = logging.getLogger(__name__)
aten = torch.ops.aten

_LINEAR_FUNCTIONS = {torch._C._nn.linear, F.linear, aten.linear.default}
_MATMUL_FUNCTIONS = {
    torch.mm: "mm", torch.matmul: "matmul", operator.matmul: "matmul", torch.addmm: "addmm",
    aten.mm.default: "mm", aten.matmul.default: "matmul", aten.addmm.default: "addmm",
}
# weight-side ops: transposes flip the storage layout, the rest keep it
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}
_TRANSPOSE_FUNCTIONS = {torch.t, torch.transpose, torch.permute, aten.t.default, aten.transpose.int,
                        aten.permute.default}
# ops after which every row (last-dimension vector) of the input is still a row of the output
_ROW_METHODS = {"view", "reshape", "contiguous", "to", "float", "half", "bfloat16", "double", "type",
                "type_as", "detach", "clone", "flatten", "transpose", "permute"}
_ROW_FUNCTIONS = {
    torch.reshape, torch.flatten, torch.clone, torch.detach, torch.transpose, torch.permute,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
    aten.detach.default, aten.alias.default, aten._to_copy.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, torch.ops.prims.convert_element_type.default,
}
_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "detach", "contiguous"}
_CAST_FUNCTIONS = {aten._to_copy.default, aten.detach.default, aten.alias.default,
                   torch.ops.prims.convert_element_type.default}


def parameter_owners(model: nn.Module, *, buffers: bool = False) -> dict[int, list[str]]:
    """``id(tensor)`` -> every qualified name of that parameter (several when tied); with
    ``buffers``, of that buffer instead."""
    owners: dict[int, list[str]] = {}
    named = model.named_buffers(remove_duplicate=False) if buffers else model.named_parameters(remove_duplicate=False)
    for name, p in named:
        owners.setdefault(id(p), []).append(name)
    return owners


@dataclass
class CapturedGraph:
    """One captured graph piece.

    Attributes:
        gm: the graph module.
        example_inputs: the real tensors bound to its placeholders, in order (Dynamo passes the
            model's parameters themselves; needed to map placeholder weights to module names).
        aliases: placeholder name -> ``(piece index, node name)`` of an earlier piece's node
            that produced the same tensor at run time (stitches groups across graph breaks).
    """

    gm: fx.GraphModule
    example_inputs: Sequence[object] = ()
    aliases: dict[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class LinearSite:
    """One linear node of a captured graph.

    Attributes:
        module: qualified name of the module owning the weight.
        weight: qualified name of the weight parameter.
        piece, node: where the linear is (graph piece index and node).
        producer: ``(piece, node name)`` of the real producer of its input.
        through: the row-preserving ops looked through, producer side last.
        in_features, out_features: of the linear.
        form: ``"linear"``, ``"module"``, ``"mm"``, ``"addmm"``, ``"matmul"`` or ``"packed"``.
        stored_transposed: the weight is stored (in, out) (transformers' ``Conv1D``).
    """

    module: str
    weight: str
    piece: int
    node: fx.Node
    producer: tuple[int, str]
    through: tuple[str, ...]
    in_features: int
    out_features: int
    form: str
    stored_transposed: bool


@dataclass
class SharingAnalysis:
    """Result of ``find_input_sharing_groups``.

    Attributes:
        groups: input-sharing groups, in graph order.
        sites: every grouped module's linear nodes.
        skipped: module (or node) -> why it is not in any group.
        notes: modules split out of a group, and why.
        graph: the networkx ``DiGraph`` producer -> module (node attribute ``kind`` is
            ``"input"`` or ``"linear"``; edges carry ``through``).
    """

    groups: list[InputGroup]
    sites: dict[str, list[LinearSite]]
    skipped: dict[str, str]
    notes: list[str]
    graph: nx.DiGraph


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _value(node: object):
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val", node.meta.get("example_value"))
    return v if isinstance(v, torch.Tensor) else None


def _known_equal(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def _keeps_rows(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` (a view/cast of ``source``) has the same rows as ``source``."""
    out, src = _value(node), _value(source)
    if out is None or src is None or out.dim() == 0 or src.dim() == 0:
        return True  # no shape metadata (e.g. symbolic_trace graphs): trust the op list
    return _known_equal(out.shape[-1], src.shape[-1]) and _known_equal(out.numel(), src.numel())


def _is_row_preserving(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        ok = node.target in _ROW_METHODS
    elif node.op == "call_function":
        if node.target in (F.dropout, aten.dropout.default):
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            ok = training is False
        else:
            ok = node.target in _ROW_FUNCTIONS
    elif node.op == "call_module":
        m = modules.get(node.target)
        ok = isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and not m.training)
    else:
        ok = False
    return ok and _keeps_rows(node, node.args[0])


def _weight_source(node: fx.Node) -> tuple[fx.Node, int]:
    """Follow the weight operand back through casts and transposes: (source, transposes)."""
    flips = 0
    while True:
        if node.op == "call_method" and node.target in _TRANSPOSE_METHODS or (
            node.op == "call_function" and node.target in _TRANSPOSE_FUNCTIONS
        ) or (node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",))):
            flips += 1
        elif not (node.op == "call_method" and node.target in _CAST_METHODS
                  or node.op == "call_function" and node.target in _CAST_FUNCTIONS):
            return node, flips
        if not node.args or not isinstance(node.args[0], fx.Node):
            return node, flips
        node = node.args[0]


def positional_arguments(node: fx.Node) -> list:
    """``node``'s arguments in its op's parameter order: keywords are placed by the op's schema
    (a ``torch.ops`` overload) or a Python callable's signature, so callers can read a parameter by
    its position in the contract they know (``passes.rewrite.QuantizedOps``) however the traced
    call passed it. An absent parameter reads as its default, else None."""
    args = list(node.args)
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for a in schema.arguments[len(args):]:
            args.append(node.kwargs.get(a.name, a.default_value if a.has_default_value() else None))
        return args
    try:
        parameters = list(inspect.signature(node.target).parameters.values())
    except (TypeError, ValueError):  # no signature to place keywords by
        return args
    for param in parameters[len(args):]:
        args.append(node.kwargs.get(param.name, None if param.default is inspect.Parameter.empty else param.default))
    return args


def _match_linear(node: fx.Node, modules: Mapping[str, nn.Module], packed_linears: Collection[object] = ()):
    """``(x, weight operand, weight source, stored (in, out), form)`` when ``node`` is a linear.

    The source is the weight operand followed back through casts and transposes; an odd number
    of transposes flips the storage layout.
    """
    if node.op == "call_function" and node.target in packed_linears:
        x, packed = positional_arguments(node)[:2]
        return x, packed, packed, False, "packed"
    if node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
        x = node.args[0] if node.args else node.kwargs.get("input")
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if not (isinstance(x, fx.Node) and isinstance(w, fx.Node)):
            return None
        src, flips = _weight_source(w)
        return x, w, src, flips % 2 == 1, "linear"  # F.linear's operand is (out, in)
    if node.op == "call_function" and node.target in _MATMUL_FUNCTIONS:
        form = _MATMUL_FUNCTIONS[node.target]
        args = node.args[1:3] if form == "addmm" else node.args[:2]
        if len(args) < 2 or not all(isinstance(a, fx.Node) for a in args):
            return None
        x, w = args
        src, flips = _weight_source(w)
        return x, w, src, flips % 2 == 0, form  # x @ W's operand is (in, out)
    if node.op == "call_module":
        m = modules.get(node.target)
        weight = getattr(m, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and node.args and isinstance(node.args[0], fx.Node):
            if isinstance(m, nn.Embedding):
                return None
            return node.args[0], node, node, type(m).__name__ == "Conv1D", "module"
    return None


class _Resolver:
    """Maps weight nodes of the pieces to parameter names, and inputs to producers."""

    def __init__(self, pieces: Sequence[CapturedGraph], model: nn.Module | None, packed_linears: Collection[object]):
        self.pieces = pieces
        self.packed_linears = packed_linears
        root = model if model is not None else pieces[0].gm
        self.owners = parameter_owners(root)
        self.buffer_owners = parameter_owners(root, buffers=True)
        self.module_types = {n: m for n, m in root.named_modules(remove_duplicate=False)}
        self.nodes = [{n.name: n for n in piece.gm.graph.nodes} for piece in pieces]
        self.positions = [{n.name: i for i, n in enumerate(piece.gm.graph.nodes)} for piece in pieces]
        self.modules = [dict(piece.gm.named_modules()) for piece in pieces]
        self.inputs = []
        for piece in pieces:
            phs = [n for n in piece.gm.graph.nodes if n.op == "placeholder"]
            self.inputs.append({n.name: piece.example_inputs[i] for i, n in enumerate(phs)
                                if i < len(piece.example_inputs)})

    def tensor_of(self, piece: int, node: fx.Node):
        """The real tensor behind a weight node, and a fallback name."""
        if node.op == "placeholder":
            return self.inputs[piece].get(node.name), None
        if node.op == "get_attr":
            obj = self.pieces[piece].gm
            for part in node.target.split("."):
                obj = getattr(obj, part, None)
            return obj, node.target
        if node.op == "call_module":
            m = self.modules[piece][node.target]
            return m.weight, f"{node.target}.weight"
        return None, None

    def parameter_names(self, piece: int, node: fx.Node, *, buffer: bool = False) -> list[str]:
        """Qualified names of the parameter (or, with ``buffer``, the buffer) behind ``node``."""
        t, fallback = self.tensor_of(piece, node)
        owners = self.buffer_owners if buffer else self.owners
        if t is not None and id(t) in owners:
            return owners[id(t)]
        if fallback is None and node.op == "placeholder":
            fallback = placeholder_fqn(node)  # a Dynamo graph without its model: Dynamo's own name
        return [fallback] if fallback is not None and (buffer or isinstance(t, nn.Parameter)) else []

    def producer(self, piece: int, x: fx.Node) -> tuple[tuple[int, str], tuple[str, ...]]:
        through: list[str] = []
        while True:
            if _is_row_preserving(x, self.modules[piece]):
                through.append(_target_name(x))
                x = x.args[0]
            elif x.op == "placeholder" and x.name in self.pieces[piece].aliases:
                piece, name = self.pieces[piece].aliases[x.name]
                x = self.nodes[piece][name]
            else:
                return (piece, x.name), tuple(through)

    def describe_computed_weight(self, piece: int, w: fx.Node) -> str | None:
        """Why a weight operand that is not a parameter cannot be quantized, or None when it is
        an activation (the product is then not a linear, e.g. attention scores).

        The operand's base tensor is found by following first arguments (indexing, views,
        casts) and stopping at any linear: an indexed 3-D parameter is a fused MoE expert.
        """
        n = w
        while n.op in ("call_function", "call_method") and n.args and isinstance(n.args[0], fx.Node):
            if _match_linear(n, self.modules[piece], self.packed_linears) is not None:
                return None
            n = n.args[0]
        names = self.parameter_names(piece, n) if n.op in ("placeholder", "get_attr") else []
        if not names:
            return None
        t, _ = self.tensor_of(piece, n)
        if isinstance(t, torch.Tensor) and t.dim() >= 3:
            return (f"weight is a slice of the {t.dim()}-D parameter {names[0]} (fused MoE experts): left "
                    "unquantized")
        return (f"weight is computed from parameter {names[0]} by ops this pass does not recognise as a "
                "linear layout (transpose/cast): left unquantized")


def owner_of(names: list[str], modules: Mapping[str, nn.Module],
             tied_to_embedding: Collection[str] = ()) -> tuple[str, str | None]:
    """(the module using a weight as a linear, None) or (that module, why it cannot be grouped).

    ``names`` are all qualified names of one weight tensor (several when it is tied);
    ``tied_to_embedding``: linears allowed to share their weight with an embedding.
    """
    owners = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
    embeddings = [o for o in owners if isinstance(modules.get(o), nn.Embedding)]
    users = [o for o in owners if o not in embeddings] or owners
    if embeddings and len(users) == 1 and users[0] in tied_to_embedding:
        return users[0], None
    if embeddings:
        return users[0], f"weight is tied to the embedding {embeddings[0]}: quantizing it would change the embedding"
    if len(users) > 1:
        return users[0], f"weight is shared by modules {users}: quantizing one would untie them"
    return users[0], None


def find_input_sharing_groups(
    graph: fx.GraphModule | Sequence[CapturedGraph],
    example_inputs: Sequence[object] | None = None,
    *,
    model: nn.Module | None = None,
    filter: GroupFilter | None = None,
    packed_linears: Collection[object] = (),
) -> SharingAnalysis:
    """Group the linears of ``graph`` by the input they read.

    Args:
        graph: a ``GraphModule`` (Dynamo, AOTAutograd/aten or ``call_module`` graph), or the
            pieces of one captured forward (``CapturedGraph``, in execution order).
        example_inputs: for a single ``GraphModule``: the real tensors bound to its
            placeholders (Dynamo's ``example_inputs``); required when weights are placeholders.
        model: the module whose parameter names the groups use (default: the graph module,
            right for ``call_module`` graphs whose attributes mirror the model).
        filter: which modules may be grouped (default: all).
        packed_linears: call targets of packed linear ops, ``op(x, packed_weight, ...)``, to group
            as linears too (the weight's name is that of a buffer).

    Returns:
        ``SharingAnalysis`` with deterministic groups (graph order), skipped modules and reasons.
    """
    if isinstance(graph, fx.GraphModule):
        pieces: Sequence[CapturedGraph] = [CapturedGraph(graph, tuple(example_inputs or ()))]
    else:
        pieces = list(graph)
        if example_inputs is not None:
            raise ValueError("pass example_inputs inside each CapturedGraph when giving several pieces")
    if not pieces:
        raise ValueError("no graph to analyse: the capture produced no graph pieces")
    filter = filter or GroupFilter()
    res = _Resolver(pieces, model, packed_linears)
    sharing = nx.DiGraph()
    sites: dict[str, list[LinearSite]] = {}
    skipped: dict[str, str] = {}
    unmapped_placeholders: list[str] = []
    for p, piece in enumerate(pieces):
        for node in piece.gm.graph.nodes:
            match = _match_linear(node, res.modules[p], res.packed_linears)
            if match is None:
                continue
            where = f"piece {p} node {node.name}" if len(pieces) > 1 else f"node {node.name}"
            site = _site(res, p, node, match, where, filter, skipped, unmapped_placeholders)
            if site is None:
                continue
            module = site.module
            sites.setdefault(module, []).append(site)
            # readers of one producer with different widths cannot share (only possible when a
            # graph has no shape metadata and a width-changing view was trusted)
            key = f"{site.producer[0]}:{site.producer[1]}:{site.in_features}"
            sharing.add_node(key, kind="input")
            if module not in sharing:
                sharing.add_node(module, kind="linear", in_features=site.in_features,
                                 out_features=site.out_features, order=(p, res.positions[p][node.name]))
            sharing.add_edge(key, module, through=site.through)
    if unmapped_placeholders:
        raise ValueError(
            f"linear weights are graph inputs {unmapped_placeholders[:3]} but no tensors were given for "
            "them: pass example_inputs (the tensors bound to the placeholders) and model="
        )
    groups, notes = _groups_of(sharing, sites)
    log.debug("grouping: %d linears in %d groups, %d skipped", len(sites), len(groups), len(skipped))
    return SharingAnalysis(groups, sites, skipped, notes, sharing)


def _site(res: "_Resolver", p: int, node: fx.Node, match: tuple, where: str, filter: GroupFilter,
          skipped: dict[str, str], unmapped_placeholders: list[str]) -> LinearSite | None:
    """The linear ``match`` at ``node`` of piece ``p`` as a ``LinearSite``, or None with the reason
    in ``skipped`` (a product of two activations, attention scores, is no linear and not listed)."""
    x, w, src, stored_transposed, form = match
    names = res.parameter_names(p, src, buffer=form == "packed")
    tensor, _ = res.tensor_of(p, src)
    if not names:
        if src.op == "placeholder" and src.name not in res.inputs[p]:
            if form == "linear" or not stored_transposed:  # surely a weight operand
                unmapped_placeholders.append(src.name)
            return None
        why = res.describe_computed_weight(p, w)
        if why is None and form == "linear":
            why = "weight is an activation, not a parameter of the model: left as is"
        if why is not None:
            skipped[where] = why
        return None
    module, why = owner_of(names, res.module_types, filter.tied_to_embedding)
    if why is not None:
        skipped[module] = filter.skip.get(module, why)  # the caller's reason names its own fix
        return None
    W = tensor if isinstance(tensor, torch.Tensor) else _value(src)
    if W is None or W.dim() != 2:
        skipped[module] = f"weight {names[0]} is not 2-D: not a linear layer"
        return None
    if form == "packed":  # (..., N); the input's width is the real in_features
        xv = _value(x)
        if xv is None:
            skipped[module] = (f"the packed linear at {where} has no shape metadata on its input, so its "
                               "in_features is unknown: group a Dynamo or AOTAutograd graph")
            return None
        out_f, in_f = W.shape[-1], xv.shape[-1]
    else:
        out_f, in_f = (W.shape[1], W.shape[0]) if stored_transposed else (W.shape[0], W.shape[1])
    why = filter.reason(module, int(out_f))
    if why is not None:
        skipped[module] = why
        return None
    producer, through = res.producer(p, x)
    return LinearSite(module, names[0], p, node, producer, through, int(in_f), int(out_f), form, stored_transposed)


def _groups_of(sharing: nx.DiGraph, sites: dict[str, list[LinearSite]]) -> tuple[list[InputGroup], list[str]]:
    """The groups (graph order): the readers of each input; a linear reading several inputs alone."""
    by_order = lambda n: sharing.nodes[n]["order"]
    alone = sorted((m for m in sites if sharing.in_degree(m) > 1), key=by_order)
    notes = [f"{m} reads {sharing.in_degree(m)} different inputs; it gets its own group" for m in alone]
    member_sets = [[m] for m in alone]
    for key, kind in sharing.nodes(data="kind"):
        if kind == "input":
            member_sets.append(sorted((m for m in sharing.successors(key) if m not in alone), key=by_order))
    groups = sorted((_make_group(ms, sharing) for ms in member_sets if ms), key=lambda g: by_order(g.members[0]))
    return groups, notes


def _make_group(members: list[str], sharing: nx.DiGraph) -> InputGroup:
    # one producer key per input width, so all members share members[0]'s in_features
    return InputGroup(group_name(members), tuple(members), sharing.nodes[members[0]]["in_features"],
                      tuple(sharing.nodes[m]["out_features"] for m in members))
