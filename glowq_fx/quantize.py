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

Steps 1-2 are ``calibrate``; its ``Calibration`` can be passed to ``quantize_`` instead of the
batches, so that several methods or ranks share one calibration run (the accuracy benchmark does).

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
from glowq_fx.calibrate import GroupStatistics
from glowq_fx.hooks import collect_statistics
from glowq_fx.kernels.layout import pack
from glowq_fx.modules.linear import QuantizedLinear, SharedProjection, linear_weight
from glowq_fx.quant import quantization_error, quantize_gptq, quantize_rtn
from glowq_fx.select import choose_groups, ranking
from glowq_fx.selective import Corrections, check_lm_batch, loss_curve_knee
from passes.grouping import InputGroup, group_name

log = logging.getLogger(__name__)

PROJECTIONS = "glowq_projections"  # ModuleDict on a group's common ancestor holding its B
# selective="auto": the loss curve is measured on the first AUTO_CURVE_TOKENS calibration tokens
# at about AUTO_CURVE_POINTS values of k (a forward pass each). The same tokens at every k, so
# the curve is smooth; 4096 tokens place SmolLM2's knee where 16384 do (k=80 of 120) in a quarter
# of the time.
AUTO_CURVE_TOKENS = 4096
AUTO_CURVE_POINTS = 16


def curve_batches(batches: list, max_tokens: int = AUTO_CURVE_TOKENS) -> list:
    """The leading rows of the first batches, ``max_tokens`` tokens (rows x length) at most but at
    least one row; every tensor of a batch whose first dimension is the batch's rows is cut alike."""
    out, left = [], max_tokens
    for batch in batches:
        rows, length = batch["input_ids"].shape
        take = min(rows, max(left // length, 0 if out else 1))  # the first batch gives one row at least
        if take == 0:
            break
        out.append({k: v[:take] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v
                    for k, v in batch.items()})
        left -= take * length
        if left <= 0:
            break
    return out


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
    weight_error: float = 0.0  # ||E||_F / ||W||_F over the members (the quantization alone)
    restore_gain: float = 0.0  # whitened error the solved correction removes (GlowQ-S score)
    candidate_factor_bytes: int = 0  # bytes of the solved factors, stored or not
    restored: bool = True  # False: GlowQ-S left this group uncorrected
    member_gains: tuple[float, ...] = ()  # whitened error each member's correction removes

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
    selection: dict | None = None  # selective="auto": the measured loss curve and the knee

    def total(self, key: str) -> int:
        return sum(getattr(g, key) for g in self.groups)

    @property
    def quantized_bytes(self) -> int:
        return self.total("code_bytes") + self.total("scale_bytes") + self.total("factor_bytes")

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "groups": [asdict(g) for g in self.groups],
                "skipped": dict(self.skipped), "graph_breaks": list(self.graph_breaks),
                "n_batches": self.n_batches, "n_tokens": self.n_tokens, "time_s": self.time_s,
                "selection": self.selection}

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
        if self.config.selective is not None:
            kept = [g for g in self.groups if g.restored]
            lines.append(f"GlowQ-S ({self.config.selective!r}): corrections kept for {len(kept)} of {len(self.groups)} "
                         f"groups, {self.total('factor_bytes'):,} of {self.total('candidate_factor_bytes'):,} factor bytes")
            if self.selection is not None:
                curve = self.selection["curve"]
                lines.append(f"  knee of the calibration loss ({self.selection['curve_tokens']} tokens): "
                             f"{curve[0]['loss']:.4f} with none, {curve[-1]['loss']:.4f} with all corrections, "
                             f"kept the best {self.selection['kept']}")
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


def _projection_slot(model: nn.Module, members: Sequence[str]) -> tuple[nn.Module, str]:
    """Where a group's projection lives: ``glowq_projections[key]`` of the members' common ancestor."""
    label = group_name(members)
    ancestor_name = _common_ancestor(members)
    key = label[len(ancestor_name) + 1:] if ancestor_name else label
    return model.get_submodule(ancestor_name), key.replace(".", "_")


def _register_projection(model: nn.Module, projection: SharedProjection) -> None:
    """Register ``projection`` once, under ``glowq_projections`` of its members' common ancestor."""
    ancestor, key = _projection_slot(model, projection.members)
    holder = getattr(ancestor, PROJECTIONS, None)
    if holder is None:
        holder = nn.ModuleDict()
        ancestor.add_module(PROJECTIONS, holder)
    holder[key] = projection


def _detach(model: nn.Module, report: GroupReport, pending) -> None:
    """Undo ``_attach``: the members lose their correction, the projections leave the module tree."""
    for members, _, _ in pending:
        for name in members:
            model.get_submodule(name).set_correction(None, None)
        ancestor, key = _projection_slot(model, members)
        holder = getattr(ancestor, PROJECTIONS)
        del holder[key]
        if len(holder) == 0:
            delattr(ancestor, PROJECTIONS)
    report.factor_bytes, report.restored = 0, False


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _quantize_group(model: nn.Module, modules: dict[str, nn.Module], g: InputGroup, S: torch.Tensor,
                    config: GlowQConfig) -> tuple[GroupReport, list]:
    """Quantize the group's members in place (uncorrected) and solve its correction; the factors
    come back pending, to be attached by ``_attach`` once GlowQ-S has chosen."""
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
    # one solve per group: GlowQ's shared B is capped by what the stacked error can hold, the
    # independent methods cap each member's rank (and whiten S once for the group); "none": rank 0
    rank = {"glowq": min(config.rank, g.in_features, sum(g.out_features)), "none": 0}.get(config.method, config.rank)
    corr = solve(config.method, errors, S, rank, cap_rank=config.method != "glowq", **kw)
    solved = corr.report  # one solve for the whole group
    units = [(g.members, corr.B[0], corr.A)] if corr.shared else [
        ((name,), B, [A]) for name, A, B in zip(g.members, corr.A, corr.B)]
    pending = [(members, B.to(dtype), [A.to(dtype) for A in As])
               for members, B, As in units if B.shape[0] > 0]  # rank 0: nothing to store
    code_bytes = scale_bytes = dense_bytes = 0
    for name, W, qw in zip(g.members, Ws, qws):
        qlinear = QuantizedLinear(pack(qw), getattr(modules[name], "bias", None))  # correction attached later
        _swap(model, name, qlinear)
        code_bytes += qlinear.qweight.nbytes
        scale_bytes += qlinear.scales.nbytes + qlinear.zeros.nbytes
        dense_bytes += W.numel() * W.element_size()
    err_sq = sum(float(E.double().pow(2).sum()) for E in errors)
    w_sq = sum(float(W.double().pow(2).sum()) for W in Ws)
    before, after = solved.whitened_error_before, solved.whitened_error_after
    report = GroupReport(
        name=g.name, members=g.members, in_features=g.in_features, out_features=g.out_features,
        rank=solved.rank, error_before=before, error_after=after,
        code_bytes=code_bytes, scale_bytes=scale_bytes, factor_bytes=0, dense_bytes=dense_bytes,
        solve_time_s=solved.time_s, weight_error=(err_sq / w_sq) ** 0.5 if w_sq else 0.0,
        restore_gain=before - after,
        member_gains=tuple(b - a for b, a in zip(solved.member_errors_before, solved.member_errors_after)),
        candidate_factor_bytes=sum(B.nbytes + sum(A.nbytes for A in As) for _, B, As in pending),
        restored=False,
    )
    return report, pending


def _attach(model: nn.Module, report: GroupReport, pending) -> None:
    """Register the group's projection(s) and give each member its ``A_i``."""
    for members, B, As in pending:
        projection = SharedProjection(B, members)
        _register_projection(model, projection)
        for name, A in zip(members, As):
            model.get_submodule(name).set_correction(A, projection)
    report.factor_bytes = report.candidate_factor_bytes
    report.restored = True


def _ranked_candidates(reports: list[GroupReport]) -> list[int]:
    """Indices of the groups with a correction, best first: removed whitened error per factor byte."""
    candidates = [i for i, r in enumerate(reports) if r.candidate_factor_bytes > 0]
    return [candidates[j] for j in ranking([max(reports[i].restore_gain, 0.0) for i in candidates],
                                           [reports[i].candidate_factor_bytes for i in candidates])]


def _select(reports: list[GroupReport], policy) -> set[int]:
    """Indices of the groups whose corrections are kept (all when ``policy`` is None) for the
    policies decided from the report alone (a fraction or a byte budget)."""
    ranked = _ranked_candidates(reports)
    if policy is None:
        return set(ranked)
    chosen = choose_groups([max(reports[i].restore_gain, 0.0) for i in ranked],
                           [reports[i].candidate_factor_bytes for i in ranked], policy)
    return {ranked[j] for j in chosen}


def _select_auto(model: nn.Module, reports: list[GroupReport], pending: list, batches: list,
                 progress: bool) -> tuple[set[int], dict | None]:
    """``selective="auto"``: attach every correction, measure the calibration loss with the best
    ``k`` groups corrected (ranked as ``_select`` ranks), keep the groups up to the knee of loss
    against bytes, detach the others. Returns the kept indices and the measured curve."""
    ranked = _ranked_candidates(reports)
    if not ranked:
        return set(), None
    for i in ranked:
        _attach(model, reports[i], pending[i])
    corrections = Corrections(model)
    scored = curve_batches(batches)
    was_training = model.training
    model.eval()
    try:
        k, points = loss_curve_knee(model, corrections, [[group_name(m) for m, _, _ in pending[i]] for i in ranked],
                                    [reports[i].candidate_factor_bytes for i in ranked], scored,
                                    points=AUTO_CURVE_POINTS, progress=progress)
    finally:
        model.train(was_training)
    for i in ranked[k:]:
        _detach(model, reports[i], pending[i])
    selection = {"policy": "auto", "ranking": "restore_gain per factor byte", "kept": k, "candidates": len(ranked),
                 "curve_tokens": sum(b["input_ids"].numel() for b in scored), "curve": [asdict(p) for p in points]}
    return set(ranked[:k]), selection


@dataclass
class Calibration:
    """Groups and their ``S`` from one calibration run: ``calibrate(model, batches, config)``.

    ``quantize_`` accepts it in place of the batches, so one run serves several methods or ranks
    (every method reads the same ``S`` of the unquantized model's group inputs). It belongs to the
    weights it was collected on: ``quantize_`` checks each group's weight fingerprint and refuses
    a model whose weights differ (use ``copy.deepcopy`` of the calibrated model).
    """

    groups: list[InputGroup]
    statistics: GroupStatistics
    fingerprints: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    graph_breaks: list[str] = field(default_factory=list)
    n_batches: int = 0
    n_tokens: int = 0
    time_s: float = 0.0
    batches: list = field(default_factory=list, repr=False)  # selective="auto" measures its loss curve on them


def _fingerprint(modules: dict[str, nn.Module], g: InputGroup) -> float:
    """Sum of |W| over the group's members in float64: cheap, and differs for other weights."""
    total = 0.0
    for name in g.members:
        W = linear_weight(modules[name]) if name in modules else None
        if W is None:
            return float("nan")
        total += W.detach().double().abs().sum().item()
    return total


def calibrate(
    model: nn.Module,
    calibration: Iterable[object],
    config: GlowQConfig | None = None,
    *,
    groups: Sequence[InputGroup] | None = None,
    run: Run = run_batch,
    progress: bool = True,
) -> Calibration:
    """Find ``model``'s groups (unless given) and collect one ``S`` per group; the model is unchanged.

    Arguments as for ``quantize_``.
    """
    t0 = time.perf_counter()
    config = _check_config(config)
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
    finally:
        model.train(was_training)
    n_tokens = max((stats[g.name].n_tokens for g in groups), default=0)
    log.info("calibrated %d groups on %d batches; S matrices hold %.1f MB", len(groups), len(batches),
             stats.nbytes() / 2**20)
    modules = dict(model.named_modules())
    fingerprints = {g.name: _fingerprint(modules, g) for g in groups}
    return Calibration(list(groups), stats, fingerprints, skipped, breaks, len(batches), n_tokens,
                       time.perf_counter() - t0, list(batches))


def _check_auto_batches(batches: list) -> None:
    """``selective="auto"`` scores a causal LM's next-token loss: say so before any work is done."""
    if not batches:
        raise ValueError("selective='auto' measures the calibration loss, but this Calibration holds no batches; "
                         "build it with calibrate(), or choose a fraction or a byte budget")
    for b in batches:
        check_lm_batch(b)


def _check_config(config: GlowQConfig | None) -> GlowQConfig:
    config = config if config is not None else GlowQConfig()
    if not isinstance(config, GlowQConfig):
        raise ValueError(f"config must be a GlowQConfig, got {type(config).__name__}")
    return config


def _check_reuse(model: nn.Module, calibrated: Calibration, groups) -> None:
    if groups is not None:
        raise ValueError("pass groups to calibrate(), not to quantize_() with a Calibration")
    modules = dict(model.named_modules())
    _check_given_groups(model, calibrated.groups)
    for g in calibrated.groups:
        now, then = _fingerprint(modules, g), calibrated.fingerprints[g.name]
        if not abs(now - then) <= 1e-9 * max(abs(then), 1.0):
            raise ValueError(f"group {g.name}: the model's weights differ from those this Calibration was "
                             "collected on; calibrate this model (or quantize a copy of the calibrated one)")


def quantize_(
    model: nn.Module,
    calibration: Iterable[object] | Calibration,
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
            excludes padding from ``S``), tuples of positional arguments, or tensors. Or a
            ``Calibration`` from ``calibrate`` (of this model's weights), reused without running
            the model again.
        config: ``GlowQConfig`` (default: GlowQ, rank 64, RTN W4 g128).
        groups: precomputed groups (``find_groups(model, batch, config).groups``) to skip the
            graph capture.
        run: ``run(model, batch)`` does one forward pass (default ``capture.run_batch``).
        progress: show tqdm bars over calibration batches and over groups.

    Returns:
        ``QuantizationReport``; ``print(report)`` shows the per-group table.
    """
    t0 = time.perf_counter()
    config = _check_config(config)
    if isinstance(calibration, Calibration):
        check_model(model)
        _check_reuse(model, calibration, groups)
        calibrated, reused = calibration, True
    else:
        calibrated, reused = calibrate(model, calibration, config, groups=groups, run=run, progress=progress), False
    if config.selective == "auto":
        _check_auto_batches(calibrated.batches)
    modules = dict(model.named_modules())
    rows, pending = [], []
    with torch.no_grad():
        for g in _progress(progress, "groups", len(calibrated.groups))(calibrated.groups):
            S = calibrated.statistics[g.name].value() if reused else calibrated.statistics.pop(g.name)
            row, factors = _quantize_group(model, modules, g, S, config)
            rows.append(row)
            pending.append(factors)
        selection = None
        if config.selective == "auto":
            chosen, selection = _select_auto(model, rows, pending, calibrated.batches, progress)
        else:
            chosen = _select(rows, config.selective)
            for i in chosen:
                _attach(model, rows[i], pending[i])
        for i, row in enumerate(rows):
            if i not in chosen:  # uncorrected: the model's error is the quantization's
                row.error_after, row.rank = row.error_before, 0
    return QuantizationReport(config, rows, dict(calibrated.skipped), list(calibrated.graph_breaks),
                              calibrated.n_batches, calibrated.n_tokens, time.perf_counter() - t0, selection)
