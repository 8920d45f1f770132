"""``quantize_(model, calibration, GlowQConfig())``: the one verb before ``torch.compile``.

1. Capture the model's graph on the first calibration batch and find its input-sharing groups
   (``capture.find_groups``; no per-architecture config).
2. Run every calibration batch once, accumulating one ``S = E[x x^T]`` per group from a
   pre-hook on the group's first member. Activations are never kept: the extra memory is the
   groups' ``S`` (d_in^2 each) plus one group's work while it is quantized.
3. Per group: quantize each member (RTN, or GPTQ driven by the same ``S``), solve the
   correction (``decompose.solve``: GlowQ's shared ``B``, or QERA / LQER / SVD per member),
   and swap each member for a ``QuantizedLinear`` in place. The group's ``SharedProjection``
   is registered once, under ``glowq_projections`` of the members' closest common ancestor.

Ranks are capped at what a group's error can hold: ``min(rank, in_features, sum d_out)`` for
the shared ``B``, ``min(rank, in_features, d_out_i)`` per member for independent methods;
the report gives the rank each group got.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from glowq_fx._text import format_table
from glowq_fx.capture import Run, check_calibration, check_model, check_one_dtype, find_groups, run_batch
from glowq_fx.config import GlowQConfig
from glowq_fx.decompose import solve
from glowq_fx.hooks import collect_statistics
from glowq_fx.kernels.layout import pack
from glowq_fx.modules.linear import QuantizedLinear, SharedProjection, linear_weight
from glowq_fx.quant import quantization_error, quantize_gptq, quantize_rtn
from passes.grouping import InputGroup, group_name

log = logging.getLogger(__name__)

PROJECTIONS = "glowq_projections"  # ModuleDict on a group's common ancestor holding its B


@dataclass
class GroupReport:
    """One group's outcome.

    ``error_before`` / ``error_after`` are the whitened errors ``tr(E S E^T)`` (raw ``S``,
    i.e. the mean squared output error per token) summed over members, before and after the
    correction. Bytes are those stored: packed 4-bit codes, scales plus zeros, and the
    correction factors (every ``A_i`` and the group's ``B``, or each member's ``B_i``).
    """

    name: str
    members: tuple[str, ...]
    in_features: int
    out_features: tuple[int, ...]
    rank: int
    error_before: float
    error_after: float
    code_bytes: int
    scale_bytes: int
    factor_bytes: int
    dense_bytes: int
    solve_time_s: float

    @property
    def relative_error(self) -> float:
        return self.error_after / self.error_before if self.error_before else 0.0


@dataclass
class QuantizationReport:
    """What ``quantize_`` did: per-group rows, skipped modules with reasons, totals."""

    config: GlowQConfig
    groups: list[GroupReport]
    skipped: dict[str, str] = field(default_factory=dict)
    graph_breaks: list[str] = field(default_factory=list)
    n_batches: int = 0
    n_tokens: int = 0
    time_s: float = 0.0

    def total(self, key: str) -> int:
        return sum(getattr(g, key) for g in self.groups)

    @property
    def quantized_bytes(self) -> int:
        return self.total("code_bytes") + self.total("scale_bytes") + self.total("factor_bytes")

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "groups": [asdict(g) for g in self.groups],
                "skipped": dict(self.skipped), "graph_breaks": list(self.graph_breaks),
                "n_batches": self.n_batches, "n_tokens": self.n_tokens, "time_s": self.time_s}

    def table(self) -> str:
        rows = [[g.name, str(len(g.members)), str(g.in_features), str(sum(g.out_features)), str(g.rank),
                 f"{g.error_before:.4g}", f"{g.error_after:.4g}", f"{g.relative_error:.3f}",
                 f"{g.code_bytes + g.scale_bytes:,}", f"{g.factor_bytes:,}"] for g in self.groups]
        before, after = self.total("error_before"), self.total("error_after")
        rows.append(["total", str(sum(len(g.members) for g in self.groups)),
                     "", "", "", f"{before:.4g}", f"{after:.4g}", f"{after / before if before else 0:.3f}",
                     f"{self.total('code_bytes') + self.total('scale_bytes'):,}", f"{self.total('factor_bytes'):,}"])
        headers = ["group", "k", "d_in", "sum d_out", "rank", "err before", "err after", "after/before",
                   "W4 bytes", "factor bytes"]
        return format_table(headers, rows)

    def __str__(self) -> str:
        dense = self.total("dense_bytes")
        lines = [f"glowq-fx: {sum(len(g.members) for g in self.groups)} linears in {len(self.groups)} groups, "
                 f"method {self.config.method}, rank {self.config.rank}, {self.config.quantizer.upper()} "
                 f"W{self.config.bits} g{self.config.group_size}; {self.n_batches} batches, {self.n_tokens} tokens, "
                 f"{self.time_s:.1f} s",
                 f"bytes: {dense:,} dense -> {self.quantized_bytes:,} quantized "
                 f"({self.quantized_bytes / dense if dense else 0:.3f}x)", self.table()]
        if self.skipped:
            lines.append("not quantized: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items()))
        return "\n".join(lines)


def _progress(enabled: bool, desc: str, total: int):
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, total=total, disable=not enabled, leave=False)


def _check_given_groups(model: nn.Module, groups: Sequence[InputGroup]) -> list[InputGroup]:
    modules = dict(model.named_modules())
    seen: set[str] = set()
    for g in groups:
        if not isinstance(g, InputGroup):
            raise ValueError(f"groups must be InputGroup objects (from find_groups), got {type(g).__name__}")
        for name in g.members:
            if name not in modules:
                raise ValueError(f"group {g.name}: the model has no module {name!r}")
            W = linear_weight(modules[name])
            if W is None:
                raise ValueError(f"group {g.name}: {name} is a {type(modules[name]).__name__}, not an nn.Linear "
                                 "or Conv1D")
            if W.shape[1] != g.in_features:
                raise ValueError(f"group {g.name}: {name} has in_features {W.shape[1]}, the group {g.in_features}")
            if name in seen:
                raise ValueError(f"{name} appears in two groups; a module belongs to one group")
            seen.add(name)
        check_one_dtype(g, modules)
    return list(groups)


def _common_ancestor(members: Sequence[str]) -> str:
    parts = [m.split(".")[:-1] for m in members]
    common = os.path.commonprefix(parts)
    return ".".join(common)


def _register_projection(model: nn.Module, projection: SharedProjection) -> None:
    """Register ``projection`` once, under ``glowq_projections`` of its members' common ancestor."""
    members = projection.members
    label = group_name(members)
    ancestor_name = _common_ancestor(members)
    ancestor = model.get_submodule(ancestor_name)
    holder = getattr(ancestor, PROJECTIONS, None)
    if holder is None:
        holder = nn.ModuleDict()
        ancestor.add_module(PROJECTIONS, holder)
    key = label[len(ancestor_name) + 1:] if ancestor_name else label
    holder[key.replace(".", "_")] = projection


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _quantize_group(model: nn.Module, modules: dict[str, nn.Module], g: InputGroup, S: torch.Tensor,
                    config: GlowQConfig) -> GroupReport:
    Ws = [linear_weight(modules[n]).detach() for n in g.members]
    dtype, device = Ws[0].dtype, Ws[0].device
    S = S.to(device)
    if config.quantizer == "gptq":
        qws = [quantize_gptq(W, S, config.group_size, bits=config.bits, symmetric=config.symmetric,
                             damp=config.gptq_damp, block_size=config.gptq_block_size,
                             act_order=config.gptq_act_order) for W in Ws]
    else:
        qws = [quantize_rtn(W, config.group_size, bits=config.bits, symmetric=config.symmetric) for W in Ws]
    errors = [quantization_error(W, qw) for W, qw in zip(Ws, qws)]
    kw = dict(shrinkage=config.shrinkage, mode=config.svd, oversample=config.oversample,
              power_iters=config.power_iters, seed=config.seed,
              dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if config.method in ("glowq", "none"):  # one solve for the group ("none": rank 0)
        rank = 0 if config.method == "none" else min(config.rank, g.in_features, sum(g.out_features))
        solved = [(g.members, solve(config.method, errors, S, rank, **kw))]
    else:  # one solve per member, each rank capped by that member's error
        solved = [((name,), solve(config.method, [E], S, min(config.rank, g.in_features, E.shape[0]), **kw))
                  for name, E in zip(g.members, errors)]
    reports = [corr.report for _, corr in solved]
    factors: dict[str, tuple[torch.Tensor, SharedProjection]] = {}
    factor_bytes = 0
    for members, corr in solved:
        if corr.report.rank == 0:
            continue
        projection = SharedProjection(corr.B[0].to(dtype), members)
        _register_projection(model, projection)
        factor_bytes += projection.B.nbytes
        for name, A in zip(members, corr.A):
            factors[name] = (A, projection)
    code_bytes = scale_bytes = dense_bytes = 0
    for name, W, qw in zip(g.members, Ws, qws):
        A, projection = factors.get(name, (None, None))
        qlinear = QuantizedLinear(pack(qw), getattr(modules[name], "bias", None), A, projection)
        _swap(model, name, qlinear)
        code_bytes += qlinear.qweight.nbytes
        scale_bytes += qlinear.scales.nbytes + qlinear.zeros.nbytes
        factor_bytes += 0 if qlinear.A is None else qlinear.A.nbytes
        dense_bytes += W.numel() * W.element_size()
    rank = max(r.rank for r in reports)
    return GroupReport(
        name=g.name, members=g.members, in_features=g.in_features, out_features=g.out_features, rank=rank,
        error_before=sum(r.whitened_error_before for r in reports),
        error_after=sum(r.whitened_error_after for r in reports),
        code_bytes=code_bytes, scale_bytes=scale_bytes, factor_bytes=factor_bytes, dense_bytes=dense_bytes,
        solve_time_s=sum(r.time_s for r in reports),
    )


def quantize_(
    model: nn.Module,
    calibration: Iterable[object],
    config: GlowQConfig | None = None,
    *,
    groups: Sequence[InputGroup] | None = None,
    run: Run = run_batch,
    progress: bool = True,
) -> QuantizationReport:
    """Quantize ``model`` in place: 4-bit weights plus a low-rank correction per ``config``.

    Args:
        model: a floating-point model on any device (one dtype per group).
        calibration: batches of model inputs on the model's device: mappings of keyword
            arguments (``{"input_ids": (B, T) int64, "attention_mask": (B, T)}``; the mask
            excludes padding from ``S``), tuples of positional arguments, or tensors.
        config: ``GlowQConfig`` (default: GlowQ, rank 64, RTN W4 g128).
        groups: precomputed groups (``find_groups(model, batch, config).groups``) to skip the
            graph capture.
        run: ``run(model, batch)`` does one forward pass (default ``capture.run_batch``).
        progress: show tqdm bars over calibration batches and over groups.

    Returns:
        ``QuantizationReport``; ``print(report)`` shows the per-group table.
    """
    t0 = time.perf_counter()
    config = config if config is not None else GlowQConfig()
    if not isinstance(config, GlowQConfig):
        raise ValueError(f"config must be a GlowQConfig, got {type(config).__name__}")
    check_model(model)
    batches = check_calibration(model, calibration)
    was_training = model.training
    model.eval()  # calibration statistics without dropout
    try:
        if groups is None:
            discovery = find_groups(model, batches[0], config, run=run)
            groups, skipped, breaks = discovery.groups, discovery.skipped, discovery.graph_breaks
        else:
            groups, skipped, breaks = _check_given_groups(model, groups), {}, []
        stats = collect_statistics(model, groups, batches, run, dtype=config.stats_dtype,
                                   progress=_progress(progress, "calibration", len(batches)))
        n_tokens = max(stats[g.name].n_tokens for g in groups)
        log.info("calibrated %d groups on %d batches; S matrices hold %.1f MB", len(groups), len(batches),
                 stats.nbytes() / 2**20)
        modules = dict(model.named_modules())
        rows = []
        with torch.no_grad():
            for g in _progress(progress, "groups", len(groups))(groups):
                rows.append(_quantize_group(model, modules, g, stats.pop(g.name), config))
    finally:
        model.train(was_training)
    return QuantizationReport(config, rows, skipped, breaks, len(batches), n_tokens, time.perf_counter() - t0)
