"""Capture a model's graph on one batch and find its input-sharing groups.

``find_groups`` runs the model once under ``torch.compile`` with a recording backend (the graph
is what ``glowq_backend`` will see later), hands the captured pieces to
``passes.grouping.find_input_sharing_groups``, then runs it once more eagerly with forward
hooks to learn which linears actually ran. Linears that ran but appear in no captured graph
(a frame Dynamo skipped, or a capture that failed) are grouped by the hooks instead, with a
warning: hooks see sharing only through the identical tensor object, not through views or
casts. Graph breaks are named in a warning; groups are stitched across them by matching the
tensors one piece returns with those the next one receives.

The recording backend compiles a function with a fresh code object, so the compile cache
entries it creates die with it: capture leaves nothing behind in Dynamo's cache of the
user's own functions, and changes no global setting.
"""
from __future__ import annotations

import inspect
import logging
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from glowq_fx import _dynamo
from glowq_fx.config import GlowQConfig
from glowq_fx.hooks import TensorKeys, input_sharing_groups
from glowq_fx.modules.linear import QuantizedLinear, linear_weight
from passes.grouping import (
    CapturedGraph, GroupFilter, InputGroup, SharingAnalysis, find_input_sharing_groups, owner_of, parameter_owners,
)

log = logging.getLogger(__name__)

Run = Callable[[nn.Module, object], object]


def run_batch(model: nn.Module, batch: object) -> object:
    """One forward pass: ``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list,
    ``model(batch)`` otherwise. Mappings get ``use_cache=False`` when the model takes it: a
    KV cache is wasted memory during calibration."""
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        if "use_cache" not in kwargs and "use_cache" in _forward_parameters(model):
            kwargs["use_cache"] = False
        return model(**kwargs)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_model(model: nn.Module) -> None:
    """Raise ``ValueError`` for a model that cannot be quantized: already quantized (by glowq-fx
    or another library), or with no linear layers."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected an nn.Module, got {type(model).__name__}")
    done = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if done:
        raise ValueError(f"the model is already quantized by glowq-fx ({len(done)} QuantizedLinear modules, "
                         f"e.g. {done[0]}); call quantize_ on the original floating-point model")
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    if qconfig is not None or getattr(model, "hf_quantizer", None) is not None:
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
        raise ValueError(f"the model is already quantized (quantization_config: {method}); load it in "
                         "floating point (e.g. torch_dtype=torch.bfloat16, no quantization_config) first")
    linears = 0
    for name, m in model.named_modules():
        W = linear_weight(m)
        if W is None:
            continue
        if not W.is_floating_point():
            raise ValueError(f"{name} has a {W.dtype} weight ({type(m).__name__}): the model is already "
                             "quantized; quantize the floating-point model instead")
        linears += 1
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D layers: nothing to quantize")


def _tensors(batch: object) -> list[tuple[str, Tensor]]:
    if isinstance(batch, Tensor):
        return [("input", batch)]
    if isinstance(batch, Mapping):
        return [(str(k), v) for k, v in batch.items() if isinstance(v, Tensor)]
    if isinstance(batch, (tuple, list)):
        return [(f"argument {i}", v) for i, v in enumerate(batch) if isinstance(v, Tensor)]
    return []


def check_calibration(model: nn.Module, calibration: Iterable[object]) -> list[object]:
    """The calibration batches as a list, after checking device, dtype, shape and token range.

    A batch is a mapping of model keyword arguments (``{"input_ids": (B, T) int64,
    "attention_mask": (B, T)}``), a tuple of positional arguments, or one tensor.
    """
    try:
        batches = list(calibration)
    except TypeError:
        raise ValueError(f"calibration must be an iterable of batches, got {type(calibration).__name__}") from None
    if not batches:
        raise ValueError("calibration is empty: pass at least one batch, e.g. [{'input_ids': ids}]")
    device, dtype = model_device(model), model_dtype(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    for i, batch in enumerate(batches):
        tensors = _tensors(batch)
        if not tensors:
            raise ValueError(f"calibration batch {i} holds no tensor ({type(batch).__name__}); pass a mapping "
                             "like {'input_ids': ids}, a tuple of tensors or a tensor")
        for key, t in tensors:
            if t.device != device:
                raise ValueError(f"calibration batch {i}: {key} is on {t.device} but the model is on {device}; "
                                 f"move the batch with .to('{device}')")
            if t.numel() == 0:
                raise ValueError(f"calibration batch {i}: {key} is empty (shape {tuple(t.shape)})")
            if t.is_floating_point() and t.dtype != dtype and key != "attention_mask":
                raise ValueError(f"calibration batch {i}: {key} is {t.dtype} but the model computes in {dtype}; "
                                 f"cast it with .to({dtype})")
        named = dict(tensors)
        ids = named.get("input_ids", named.get("input") if vocab is not None else None)
        if ids is None:
            continue
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"calibration batch {i}: input_ids must be integer token ids, got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"calibration batch {i}: input_ids must be (batch, sequence), got shape "
                             f"{tuple(ids.shape)}; add a batch dimension with ids.unsqueeze(0)")
        mask = named.get("attention_mask")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"calibration batch {i}: attention_mask shape {tuple(mask.shape)} differs from "
                             f"input_ids shape {tuple(ids.shape)}")
        if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"calibration batch {i}: token ids span [{int(ids.min())}, {int(ids.max())}] but "
                             f"the vocabulary has {vocab} entries; tokenize with this model's tokenizer")
    return batches


def _call(model: nn.Module, batch: object, run: Run) -> object:
    return run(model, batch)


def capture_graphs(model: nn.Module, batch: object, run: Run = run_batch) -> tuple[list[CapturedGraph], list[str]]:
    """Run ``run(model, batch)`` once under ``torch.compile`` and return the captured pieces
    (with run-time aliases across graph breaks) and the graph-break reasons."""
    pieces: list[CapturedGraph] = []
    produced: dict[int, tuple[int, str]] = {}  # tensor key -> (piece, node) that first held it
    keys = TensorKeys()  # identity without keeping the activations alive

    def record(gm: fx.GraphModule, example_inputs, **_kwargs):
        index = len(pieces)
        piece = CapturedGraph(gm, list(example_inputs))
        pieces.append(piece)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)

        def run_piece(*args):
            for node, value in zip(placeholders, args):
                if isinstance(value, Tensor):
                    earlier = produced.get(keys.get(value))
                    if earlier is not None and earlier[0] != index:
                        piece.aliases[node.name] = earlier
                    else:
                        produced.setdefault(keys.key(value), (index, node.name))
            result = gm(*args)
            values = result if isinstance(result, (tuple, list)) else (result,)
            for node, value in zip(outputs, values):
                if isinstance(value, Tensor) and isinstance(node, fx.Node):
                    produced.setdefault(keys.key(value), (index, node.name))
            return result

        return run_piece

    # a fresh code object per capture: Dynamo caches per code object, so the entries die with it
    entry = types.FunctionType(_call.__code__.replace(), _call.__globals__, "glowq_capture")
    before = _dynamo.break_counters()
    with torch.no_grad():
        torch.compile(entry, backend=record, dynamic=False)(model, batch, run)
    return pieces, _dynamo.new_break_reasons(before)


def output_head(model: nn.Module) -> str | None:
    """Qualified name of the output projection (``get_output_embeddings()``, else ``lm_head``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in model.named_modules():
        if (head is not None and m is head) or (head is None and name.split(".")[-1] == "lm_head"):
            return name
    return None


def group_filter(model: nn.Module, config: GlowQConfig) -> GroupFilter:
    skip = {}
    head = output_head(model)
    if head is not None and not config.quantize_output_head:
        skip[head] = "the output head stays in full precision (set quantize_output_head=True to quantize it)"
    return GroupFilter(skip=skip, include=config.include, exclude=config.exclude,
                       min_out_features=config.min_out_features)


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
    """

    groups: list[InputGroup]
    skipped: dict[str, str] = field(default_factory=dict)
    graph_breaks: list[str] = field(default_factory=list)
    pieces: int = 0
    from_hooks: list[str] = field(default_factory=list)
    analysis: SharingAnalysis | None = None


class GlowQWarning(UserWarning):
    """Something glowq-fx did differently from the plain path (fallbacks, skipped modules)."""


def _warn(message: str) -> None:
    warnings.warn(message, GlowQWarning, stacklevel=3)


def _names(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def find_groups(model: nn.Module, example_batch: object, config: GlowQConfig | None = None, *,
                run: Run = run_batch) -> GroupDiscovery:
    """Input-sharing groups of ``model`` from its captured graph (see the module docstring).

    Args:
        model: the floating-point model (any device, any ``nn.Module``).
        example_batch: one batch, as ``run`` takes it.
        config: filters (output head, include/exclude patterns, ``min_out_features``).
        run: ``run(model, batch)`` does one forward pass (default ``run_batch``).
    """
    config = config or GlowQConfig()
    check_model(model)
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
        _warn(f"capturing the graph of {type(model).__name__} failed ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}); falling back to forward hooks, which group "
              "linears only when they receive the very same tensor (not through views or casts)")
    if discovery.graph_breaks:
        _warn(f"the forward pass of {type(model).__name__} captured as {discovery.pieces} graphs; graph breaks: "
              f"{'; '.join(discovery.graph_breaks)}. Groups were stitched across the breaks through the tensors "
              "passed between the pieces; remove the break (e.g. data-dependent control flow) to compile one graph")

    # which linear-like modules really ran, and how hooks would group them
    hook_groups = input_sharing_groups(model, lambda m: run(m, example_batch))
    ran = {m for g in hook_groups for m in g.members}
    grouped = {m for g in discovery.groups for m in g.members}
    owners = parameter_owners(model)
    position = {name: i for i, name in enumerate(modules)}
    missing = []
    for name in sorted(ran - grouped - set(discovery.skipped), key=position.__getitem__):
        module = modules[name]
        _, why = owner_of(owners.get(id(module.weight), [f"{name}.weight"]), modules)
        why = why or filter.reason(name, linear_weight(module).shape[0])
        if why is not None:
            discovery.skipped[name] = why
        else:
            missing.append(name)
    if missing:
        _warn(f"{len(missing)} linears ran but are in no captured graph ({_names(missing)}); grouped by forward "
              "hooks instead")
        discovery.groups += [g.subset(m for m in g.members if m in missing) for g in hook_groups
                             if any(m in missing for m in g.members)]
        discovery.from_hooks = missing
    _check_members(model, discovery)
    _warn_skipped(model, discovery)
    if not discovery.groups:
        raise ValueError(f"no linear layer of {type(model).__name__} is left to quantize: "
                         f"{_names([f'{k} ({v})' for k, v in discovery.skipped.items()])}")
    return discovery


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


def _warn_skipped(model: nn.Module, discovery: GroupDiscovery) -> None:
    """One warning per kind of unusual skip (expected ones, like the output head, are logged)."""
    unusual = {k: v for k, v in discovery.skipped.items()
               if "output head" not in v and "tied to the embedding" not in v and "pattern" not in v}
    for k, v in discovery.skipped.items():
        if k not in unusual:
            log.info("not quantized: %s: %s", k, v)
    if unusual:
        details = [f"{k} ({v})" for k, v in unusual.items()]
        _warn(f"not quantized: {_names(details, limit=4)}; the report's skipped field lists them all")
    experts = sorted({n for n, m in model.named_modules()
                      if any(p.dim() >= 3 for p in m.parameters(recurse=False))
                      and not isinstance(m, nn.modules.conv._ConvNd)})
    if experts:
        _warn(f"leaving {len(experts)} MoE expert modules unquantized ({_names(experts)}): their fused 3-D "
              "expert weights are not linears; glowq-fx quantizes the dense linears only")
