"""Find a model's input-sharing groups: from its captured graph, checked by forward hooks.

``find_groups`` captures the model's graph on one batch (``graphs.capture_graphs``; the graph is
what ``glowq_backend`` will see later), hands the pieces to
``passes.grouping.find_input_sharing_groups``, then runs the model once more eagerly with
forward hooks to learn which linears actually ran. Linears that ran but appear in no captured
graph (a frame Dynamo skipped, or a capture that failed) are grouped by the hooks instead, with
a warning: hooks see sharing only through the identical tensor object, not through views or
casts. Graph breaks are named in a warning.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from glowq_fx.capture.graphs import capture_graphs
from glowq_fx.capture.hooks import input_sharing_groups
from glowq_fx.capture.linears import linear_weight
from glowq_fx.capture.run import Run, check_model, run_batch, run_sparing_logits
from glowq_fx.config import GlowQConfig
from glowq_fx.errors import warn
from passes.grouping import SharingAnalysis, find_input_sharing_groups, owner_of, parameter_owners
from passes.groups import GroupFilter, InputGroup

log = logging.getLogger(__name__)

def output_head(model: nn.Module) -> str | None:
    """Qualified name of the output projection (``get_output_embeddings()``, else ``lm_head``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in model.named_modules():
        if (head is not None and m is head) or (head is None and name.split(".")[-1] == "lm_head"):
            return name
    return None


def tied_embedding(model: nn.Module, linear: str | None) -> str | None:
    """The name of the ``nn.Embedding`` whose table is the weight of the linear ``linear``."""
    if linear is None:
        return None
    W = linear_weight(model.get_submodule(linear))
    if W is None:
        return None
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m.weight.shape == W.shape and m.weight.data_ptr() == W.data_ptr():
            return name
    return None


def group_filter(model: nn.Module, config: GlowQConfig) -> GroupFilter:
    skip, tied_ok = {}, set()
    head = output_head(model)
    table = tied_embedding(model, head)
    if head is not None and not config.quantize_output_head and config.output_head_bits is not None:
        skip[head] = (f"the output head stays out of the 4-bit groups: output_head_bits={config.output_head_bits} "
                      "stores it in int8 (unless include/exclude keep it in floating point)")
    elif head is not None and not config.quantize_output_head:
        skip[head] = ("the output head stays in full precision (output_head_bits=8 stores it in int8, "
                      "quantize_output_head=True in the 4-bit groups)")
    elif table is not None and config.embedding_bits != 4:
        skip[head] = (f"the output head's weight is the input embedding {table}'s table (tied): quantize the one "
                      "table for both with embedding_bits=4")
    elif table is not None:
        tied_ok.add(head)
    return GroupFilter(skip=skip, include=config.include, exclude=config.exclude,
                       min_out_features=config.min_out_features, tied_to_embedding=frozenset(tied_ok))


@dataclass
class GroupDiscovery:
    """What ``find_groups`` found.

    Attributes:
        groups: input-sharing groups, in graph order.
        skipped: module -> why it is not quantized.
        graph_breaks: Dynamo's reasons, when the forward did not capture as one graph.
        pieces: number of captured graph pieces (0 when the capture failed).
        from_hooks: modules grouped by forward hooks because no captured graph contained them.
        analysis: the graph analysis (None when the capture failed).
        capture_error: why the capture failed (its exception), or None.
    """

    groups: list[InputGroup]
    skipped: dict[str, str] = field(default_factory=dict)
    graph_breaks: list[str] = field(default_factory=list)
    pieces: int = 0
    from_hooks: list[str] = field(default_factory=list)
    analysis: SharingAnalysis | None = None
    capture_error: str | None = None


def _names(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def find_groups(model: nn.Module, example_batch: object, config: GlowQConfig | None = None, *,
                run: Run = run_batch) -> GroupDiscovery:
    """Input-sharing groups of ``model`` from its captured graph (see the module docstring).

    Args:
        model: the floating-point model (any device, any ``nn.Module``).
        example_batch: one batch, as ``run`` takes it.
        config: filters (output head, include/exclude patterns, ``min_out_features``).
        run: ``run(model, batch)`` does one forward pass (default ``run_batch``, here asking a
            causal LM for no more logits than the last position's: the groups never read them).
    """
    config = config or GlowQConfig()
    if run is run_batch:
        run = run_sparing_logits
    check_model(model)
    discovery = capture_groups(model, example_batch, config, run, whole=True)
    warn_discovery(discovery, f"the forward pass of {type(model).__name__}")
    experts = any(p.dim() == 3 for m in model.modules() if not isinstance(m, nn.modules.conv._ConvNd)
                  for p in m.parameters(recurse=False))
    if not discovery.groups and not experts:  # MoE experts alone are quantized by quantize_experts
        raise ValueError(f"no linear layer of {type(model).__name__} is left to quantize: "
                         f"{_names([f'{k} ({v})' for k, v in discovery.skipped.items()])}")
    return discovery


def capture_groups(model: nn.Module, example_batch: object, config: GlowQConfig, run: Run, *,
                   whole: bool = True) -> GroupDiscovery:
    """``find_groups`` without its checks and warnings (``warn_discovery`` says them). Not ``whole``:
    ``run`` runs a part of ``model`` (one block, or the model with its blocks stubbed), where no
    linear may run; the names stay the model's."""
    filter = group_filter(model, config)
    modules = dict(model.named_modules())
    discovery = GroupDiscovery(groups=[])
    try:
        pieces, discovery.graph_breaks = capture_graphs(model, example_batch, run)
        discovery.pieces = len(pieces)
        if pieces:
            discovery.analysis = find_input_sharing_groups(pieces, model=model, filter=filter)
            discovery.groups = list(discovery.analysis.groups)
            discovery.skipped.update(discovery.analysis.skipped)
    except Exception as exc:  # any capture failure; a real model error resurfaces in the eager pass below
        discovery.capture_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    # which linear-like modules really ran, and how hooks would group them
    hook_groups = input_sharing_groups(model, lambda m: run(m, example_batch), some_must_run=whole)
    ran = {m for g in hook_groups for m in g.members}
    grouped = {m for g in discovery.groups for m in g.members}
    owners = parameter_owners(model)
    position = {name: i for i, name in enumerate(modules)}
    missing = []
    for name in sorted(ran - grouped - set(discovery.skipped), key=position.__getitem__):
        module = modules[name]
        _, why = owner_of(owners.get(id(module.weight), [f"{name}.weight"]), modules, filter.tied_to_embedding)
        why = why or filter.reason(name, linear_weight(module).shape[0])
        if why is not None:
            discovery.skipped[name] = why
        else:
            missing.append(name)
    if missing:
        discovery.groups += [g.subset(m for m in g.members if m in missing) for g in hook_groups
                             if any(m in missing for m in g.members)]
        discovery.from_hooks = missing
    _check_members(model, discovery)
    return discovery


def warn_discovery(discovery: GroupDiscovery, what: str) -> None:
    """The warnings of a discovery: a failed capture, graph breaks, linears grouped by hooks, unusual
    skips (``what``: whose forward was captured, for the messages)."""
    if discovery.capture_error is not None:
        warn(f"capturing the graph of {what} failed ({discovery.capture_error}); falling back to forward hooks, "
             "which group linears only when they receive the very same tensor (not through views or casts)")
    if discovery.graph_breaks:
        warn(f"{what} captured as {discovery.pieces} graphs; graph breaks: {'; '.join(discovery.graph_breaks)}. "
             "Groups were stitched across the breaks through the tensors passed between the pieces; remove the break "
             "(e.g. data-dependent control flow) to compile one graph")
    if discovery.from_hooks:
        warn(f"{len(discovery.from_hooks)} linears ran but are in no captured graph ({_names(discovery.from_hooks)}); "
             "grouped by forward hooks instead")
    _warn_skipped(discovery)


def _check_members(model: nn.Module, discovery: GroupDiscovery) -> None:
    modules = dict(model.named_modules())
    kept = []
    for g in discovery.groups:
        members = []
        for name in g.members:
            if linear_weight(modules[name]) is None:
                discovery.skipped[name] = (f"{type(modules[name]).__name__} is used as a linear but is not an "
                                           "nn.Linear or transformers Conv1D: glowq-fx swaps only those")
            else:
                members.append(name)
        if members:
            g = g if len(members) == len(g.members) else g.subset(members)
            check_one_dtype(g, modules)
            kept.append(g)
    discovery.groups = kept


def check_one_dtype(group: InputGroup, modules: Mapping[str, nn.Module]) -> None:
    """Raise ``ValueError`` when the members of ``group`` do not share one weight dtype."""
    dtypes = {m: linear_weight(modules[m]).dtype for m in group.members}
    if len(set(dtypes.values())) > 1:
        detail = ", ".join(f"{m}: {d}" for m, d in dtypes.items())
        raise ValueError(f"the members of {group.name} read one input but have different dtypes ({detail}); "
                         "cast the model to one dtype, e.g. model.to(torch.bfloat16)")


def _warn_skipped(discovery: GroupDiscovery) -> None:
    """One warning per kind of unusual skip (expected ones, like the output head, are logged)."""
    unusual = {k: v for k, v in discovery.skipped.items()  # experts: quantize_experts takes them on their own
               if "output head" not in v and "tied to the embedding" not in v and "pattern" not in v
               and "fused MoE experts" not in v}
    for k, v in discovery.skipped.items():
        if k not in unusual:
            log.info("not quantized: %s: %s", k, v)
    if unusual:
        details = [f"{k} ({v})" for k, v in unusual.items()]
        warn(f"not quantized: {_names(details, limit=4)}; the report's skipped field lists them all")
