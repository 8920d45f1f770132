"""Quantizing the experts of MoE blocks, inside ``quantize_``.

``find_experts`` finds the experts modules (``capture.experts.experts_protocol``: fused 3-D
weights and transformers' experts marks, no class names); their statistics are collected in the
same calibration passes as the groups' (``calibration.experts``, block by block or whole);
``quantize_experts`` then quantizes every expert's weights (RTN, or GPTQ on the expert's own
tokens), solves the correction (``correction.experts``: for GlowQ one ``B`` across the experts of
every weight that reads the block input, a fused gate_up or gate and up apart, and the dense groups
reading that same input; each expert alone for the other methods; each expert's second projection
alone, on its own intermediate), and swaps in a ``QuantizedExperts`` with the same forward.
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from glowq_fx.calibration.experts import ExpertsStatistics, TracedStatistics, pooled
from glowq_fx.capture.experts import ExpertsProtocol, expert_weight, experts_protocol
from glowq_fx.capture.linears import linear_weight
from glowq_fx.config import GlowQConfig
from glowq_fx.correction.decompose import solve
from glowq_fx.correction.experts import experts_lowrank, removed_error
from glowq_fx.kernels.layout import pack
from glowq_fx.modules.experts import QuantizedExperts, QuantizedExpertWeights, quantized_experts
from glowq_fx.modules.install import register_projection, replace_module
from glowq_fx.modules.linear import QuantizedLinear, SharedProjection
from glowq_fx.quant import quantization_error
from glowq_fx.registry import CORRECTIONS, QUANTIZERS
from glowq_fx.report import GroupReport
from passes.groups import InputGroup


def find_experts(model: nn.Module, config: GlowQConfig) -> tuple[dict[str, ExpertsProtocol | None], dict[str, str]]:
    """``(experts modules to quantize by name, modules left in floating point -> why)``: every
    module holding 3-D parameters is one or the other. A module with transformers' experts marks
    maps to its ``ExpertsProtocol``; one without them to None: its 3-D weights (one leading
    dimension, the experts) are traced during calibration (``calibration.experts.TracedStatistics``)."""
    found, skipped = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedExperts, nn.modules.conv._ConvNd)) or not any(  # a conv's weight is 3-D too
                p.dim() == 3 for p in module.parameters(recurse=False)):
            continue
        if not config.experts:
            skipped[name] = "MoE experts left in floating point (GlowQConfig(experts=False))"
            continue
        if config.include and not any(re.search(p, name) for p in config.include):
            skipped[name] = "not matched by include"
            continue
        if any(re.search(p, name) for p in config.exclude):
            skipped[name] = "matched an exclude pattern"
            continue
        protocol = experts_protocol(module)
        if not isinstance(protocol, str):
            found[name] = protocol
            continue
        leading = {p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3}
        if len(leading) != 1 or min(leading) < 2:
            skipped[name] = (f"3-D weights glowq-fx cannot run quantized: their leading dimensions {sorted(leading)} "
                             "are not one number of experts")
        else:
            found[name] = None
    if found and config.alternations:
        raise ValueError(f"alternations={config.alternations} is for dense groups; the experts of "
                         f"{sorted(found)[:2]}{' and more' if len(found) > 2 else ''} are quantized with one B across "
                         "experts, which alternation does not cover: set alternations=0, or leave the experts in "
                         "floating point (experts=False)")
    return found, skipped


def experts_statistics(model: nn.Module, experts: dict[str, ExpertsProtocol],
                       config: GlowQConfig) -> dict[str, ExpertsStatistics | TracedStatistics]:
    """Empty statistics for each experts module, to be fed by ``calibration.collect.feeding``."""
    stats = {}
    for name, p in experts.items():
        module = model.get_submodule(name)
        if p is None:
            stats[name] = TracedStatistics(name, module, getattr(torch, config.stats_dtype))
            continue
        H = expert_weight(module, p.first, 0, p.is_transposed).shape[1]
        I = expert_weight(module, p.second, 0, p.is_transposed).shape[1]
        stats[name] = ExpertsStatistics(name, p, H, I, getattr(torch, config.stats_dtype))
    return stats


def _quantize(Ws: list[torch.Tensor], moments: list[torch.Tensor], config: GlowQConfig) -> list:
    quantizer = QUANTIZERS[config.quantizer]
    return [quantizer(W, S, config.quantization) for W, S in zip(Ws, moments)]


def _row(name: str, E: int, Ws: list[torch.Tensor], weights: QuantizedExpertWeights, done: _Solved,
         factor_bytes: int) -> GroupReport:
    err_sq = sum(
        float((W.double() - weights.dequantized_weight(e, torch.float64)).pow(2).sum()) for e, W in enumerate(Ws)
    )
    w_sq = sum(float(W.double().pow(2).sum()) for W in Ws)
    return GroupReport(
        name=name, members=tuple(f"{name}[{e}]" for e in range(E)), in_features=weights.in_features,
        out_features=(weights.out_features,) * E, rank=weights.rank, error_before=done.before,
        error_after=done.after, code_bytes=weights.qweight.nbytes,
        scale_bytes=weights.scales.nbytes + weights.zeros.nbytes, factor_bytes=factor_bytes,
        dense_bytes=sum(W.numel() * W.element_size() for W in Ws), solve_time_s=done.solve_s,
        weight_error=(err_sq / w_sq) ** 0.5 if w_sq else 0.0, restore_gain=sum(done.scores),
        member_gains=tuple(done.gains), member_scores=tuple(done.scores), candidate_factor_bytes=factor_bytes,
        quantize_time_s=done.quantize_s)


@dataclass
class _WeightInputs:
    """What one 3-D weight's quantization needs: each expert's (out, in) weight, and its statistics."""

    name: str
    Ws: list[torch.Tensor]
    reads_input: bool  # every expert reads rows of the block input: one shared B for GlowQ
    S: torch.Tensor | None  # the block input's (every token), when reads_input
    S_experts: list[torch.Tensor | None]  # each expert's own rows' (None: no token reached it)
    counts: list[int]
    bias: torch.Tensor | None
    n_tokens: int  # tokens entering the block: expert e's routing frequency is counts[e] / n_tokens


def _weight_inputs(module: nn.Module, stats) -> list[_WeightInputs]:
    """Per 3-D weight of the experts module, from its statistics (protocol or traced)."""
    out = []
    if isinstance(stats, ExpertsStatistics):
        p, E = stats.protocol, stats.protocol.num_experts
        S = stats.S.value()
        everyone = pooled(stats.second, f"{stats.name}.{p.second}")
        firsts = [stats.expert_moment(stats.first, e) for e in range(E)]
        seconds = [stats.expert_moment(stats.second, e) for e in range(E)]
        counts = [int(c) for c in stats.counts]
        for w, reads, moments in ((p.first, True, firsts), (p.second, False, seconds)):
            out.append(_WeightInputs(
                w, [expert_weight(module, w, e, p.is_transposed).detach() for e in range(E)], reads,
                S if reads else None, moments if reads else [everyone if m is None else m for m in moments], counts,
                getattr(module, f"{w}_bias") if p.has_bias else None, stats.S.n_tokens))
        return out
    layout = stats.layout()
    for t in layout.traced:
        param = stats.params[t.name]
        moments = [m.value() if m.n_tokens else None for m in stats.moments[t.name]]
        if not t.reads_input:  # an expert no row reached: the other experts' rows pooled
            everyone = pooled(stats.moments[t.name], f"{stats.name}.{t.name}")
            moments = [everyone if m is None else m for m in moments]
        out.append(_WeightInputs(
            t.name, [(param[e] if t.stored_out_in else param[e].T).detach() for e in range(layout.num_experts)],
            t.reads_input, stats.S.value() if t.reads_input else None, moments,
            [int(c) for c in stats.counts[t.name]], None, stats.S.n_tokens))
    return out


def _factor_bytes(w: QuantizedExpertWeights) -> int:
    own = 0 if w.B is None else w.B.nbytes
    shared = 0 if w.projection is None else w.projection.B.nbytes
    return (0 if w.A is None else w.A.nbytes) + own + shared


def joined_groups(groups: Sequence[InputGroup], stats, experts: dict, config: GlowQConfig) -> dict[str, list]:
    """Experts module name -> the dense groups that read the very same input tensor as its experts
    (a shared expert's gate/up), which GlowQ solves with the experts' first weight: one ``B``."""
    if not CORRECTIONS[config.method].shared or config.rank == 0:
        return {}
    joins = {}
    for name in experts:
        seen = stats.inputs.get(name)
        same = [g for g in groups if seen is not None and stats.inputs.get(g.name) == seen]
        if same:
            joins[name] = same
    return joins


def _dense_members(model: nn.Module, groups: Sequence[InputGroup], S: torch.Tensor, config: GlowQConfig):
    """The joined groups' linears: (name, float weight, bias, quantized weight)."""
    out = []
    for g in groups:
        for m in g.members:
            linear = model.get_submodule(m)
            W = linear_weight(linear).detach()
            out.append((m, W, getattr(linear, "bias", None), _quantize([W], [S], config)[0]))
    return out


def quantize_experts(model: nn.Module, name: str, stats, config: GlowQConfig, factor_dtype: torch.dtype,
                     joined: Sequence[InputGroup] = ()) -> ExpertsQuantized:
    """Quantize the experts module ``name`` in place from its calibration ``stats``
    (``ExpertsStatistics`` or ``TracedStatistics``, module docstring), and with it the dense
    groups ``joined`` (``joined_groups``: their linears share the experts' ``B``). Returns one
    report row per 3-D weight (the experts as its members) and one per joined group, and each
    correction as a GlowQ-S unit (``ExpertsQuantized``). A traced module whose layout could not be
    read raises ``ValueError`` with the reason (``stats.layout()``; callers check it first)."""
    module = model.get_submodule(name)
    layout = stats.protocol if isinstance(stats, ExpertsStatistics) else stats.layout()
    if isinstance(layout, str):
        raise ValueError(f"{name}: {layout}")
    weights, quantized = {}, []
    for w in _weight_inputs(module, stats):
        t0 = time.perf_counter()
        S = None if w.S is None else w.S.to(w.Ws[0].device)
        S_experts = [None if m is None else m.to(w.Ws[0].device) for m in w.S_experts]
        qs = _quantize(w.Ws, [S if m is None else m for m in S_experts], config)
        weights[w.name] = QuantizedExpertWeights([pack(q) for q in qs], w.bias)
        quantized.append((w, qs, S, S_experts, time.perf_counter() - t0))
    # every weight that reads the block input (a fused gate_up, or gate and up apart) and the
    # joined dense groups: one B for all of them; the others each on their own
    sharing = [q for q in quantized if _shares_input(q[0], config)]
    here = _dense_members(model, joined, sharing[0][2], config) if joined and sharing else []
    solved = _shared_correction(name, sharing, here, stats, config, factor_dtype) if sharing else []
    for w, qs, S, S_experts, quantize_s in quantized:
        if not _shares_input(w, config):
            t0 = time.perf_counter()
            corrections = _corrections(w, qs, S, S_experts, config)
            before = sum(c.report.whitened_error_before for c in corrections)
            after = sum(c.report.whitened_error_after for c in corrections)
            # each expert's error measured on its own tokens: weighted by how often it is routed to
            gains = [c.report.whitened_error_before - c.report.whitened_error_after for c in corrections]
            scores = [g * c / w.n_tokens if w.n_tokens else 0.0 for g, c in zip(gains, w.counts)]
            solved.append(_Solved(w, corrections, None, quantize_s, time.perf_counter() - t0, [], before, after,
                                  gains=gains, scores=scores))
    replace_module(model, name, quantized_experts(module, weights, layout))
    rows, joined_rows = {}, {}
    for done in solved:
        target = weights[done.w.name]
        _install(model, target, done, config, factor_dtype)
        rows[done.w.name] = _row(f"{name}.{done.w.name}", len(done.w.Ws), done.w.Ws, target, done,
                                 _factor_bytes(target))
        if done.here:
            joined_rows = _joined_rows(model, joined, done.corrections[0].report, done.first_dense, done.here)
    units, followers = _selection_units(model, name, solved, weights, rows, joined_rows)
    return ExpertsQuantized([rows[w.name] for w, *_ in quantized], joined_rows,
                            [units.get(w.name, []) for w, *_ in quantized], followers)


@dataclass
class ExpertsQuantized:
    """What ``quantize_experts`` made of one experts module: a report row per 3-D weight, the rows
    of the dense groups solved with them, and for GlowQ-S each row's correction as ``Factors``
    (``selective.policy``; [] for a row that is not a unit of its own) and the rows that follow a
    unit's fate (the other weights and dense groups sharing its ``B``), by the unit's row name."""

    rows: list[GroupReport]
    joined_rows: dict[str, GroupReport]
    factors: list[list]
    followers: dict[str, list[str]]


def _selection_units(model: nn.Module, name: str, solved: list, weights: dict, rows: dict,
                     joined_rows: dict) -> tuple[dict[str, list], dict[str, list[str]]]:
    """Each correction as one GlowQ-S unit: a shared ``B`` with every weight and dense linear that
    reads it (carried by the first weight's row, which ranks for all of them), or one weight with
    each expert's own ``B``."""
    units, followers = {}, {}
    for done in solved:
        target = weights[done.w.name]
        if done.projection is not None and done.first == 0:
            sharing = [d for d in solved if d.projection is done.projection]
            leader, others = rows[done.w.name], [rows[d.w.name] for d in sharing[1:]]
            dense = [model.get_submodule(m) for m in done.projection.members[len(sharing):]]
            As = [weights[d.w.name].A for d in sharing] + [linear.A for linear in dense]
            # ranked on the whole unit's bytes; stored: B and its own A_e (the others' rows count theirs)
            leader.candidate_factor_bytes = done.projection.B.nbytes + sum(A.nbytes for A in As)
            leader.factor_bytes = done.projection.B.nbytes + target.A.nbytes
            leader.restore_gain = sum(r.restore_gain for r in (leader, *others, *joined_rows.values()))
            for d in sharing[1:]:  # ranked with the first weight's row, and their B counted there
                rows[d.w.name].candidate_factor_bytes, rows[d.w.name].factor_bytes = 0, weights[d.w.name].A.nbytes
            for r in joined_rows.values():
                r.candidate_factor_bytes = 0
            units[done.w.name] = [(done.projection.members, done.projection.B, As)]
            followers[leader.name] = [r.name for r in others] + list(joined_rows)
        elif done.projection is None and target.A is not None:
            units[done.w.name] = [((f"{name}.{done.w.name}",), target.B, [target.A])]
    return units, followers


@dataclass
class _Solved:
    """One 3-D weight's quantization and correction, before it is installed."""
    w: object
    corrections: list  # one shared correction (its members: this weight's experts among others), or each expert's
    projection: SharedProjection | None
    quantize_s: float
    solve_s: float
    here: list  # the dense members solved with it: (name, W, bias, quantized)
    before: float  # this weight's whitened errors before and after its correction, summed over its experts
    after: float
    first: int = 0  # where its experts' members start in a shared correction
    first_dense: int = 0  # where the dense members start in it
    gains: list[float] = dataclasses.field(default_factory=list)  # each expert's share of before - after
    # GlowQ-S's score of each expert's correction: the whitened error it removes on the expert's own
    # tokens times the expert's routing frequency, in the units of a dense group's gain (the mean
    # output error over every token entering the block)
    scores: list[float] = dataclasses.field(default_factory=list)


def _rank(config: GlowQConfig) -> int:
    return config.rank if CORRECTIONS[config.method].corrects else 0


def _shares_input(w, config: GlowQConfig) -> bool:
    """Whether weight ``w``'s experts get one shared ``B`` (a shared method on the block input)."""
    return bool(_rank(config)) and CORRECTIONS[config.method].shared and w.reads_input


def _shared_correction(name: str, sharing: list, here: list, stats, config: GlowQConfig,
                       factor_dtype: torch.dtype) -> list[_Solved]:
    """One ``B`` across the experts of every weight in ``sharing`` ((weight, codes, S, S_experts,
    quantize time), all reading the block input) and the dense members ``here``; one ``_Solved``
    per weight, the first carrying ``here``."""
    t0 = time.perf_counter()
    S = sharing[0][2]
    n_tokens = stats.S.n_tokens
    errors, usage, refit = [], [], []
    for w, qs, _, S_experts, _ in sharing:
        errors += [quantization_error(W, q) for W, q in zip(w.Ws, qs)]
        usage += [c / n_tokens for c in w.counts]  # the share of tokens each expert sees
        refit += S_experts
    errors += [quantization_error(W, q) for _, W, _, q in here]
    usage += [1.0] * len(here)  # a dense member sees every token
    refit += [None] * len(here)
    correction = experts_lowrank(
        errors, S, min(_rank(config), S.shape[0], sum(e.shape[0] for e in errors)),
        usage=usage if config.expert_weighting == "usage" else None, refit=refit if config.expert_refit else None,
        method=CORRECTIONS[config.method].name, **_solve_kwargs(sharing[0][0].Ws[0].dtype, config))
    members = (*(f"{name}.{w.name}" for w, *_ in sharing), *(m for m, *_ in here))
    projection = SharedProjection(correction.B[0].to(factor_dtype), members)
    solve_s = time.perf_counter() - t0
    report, solved, first = correction.report, [], 0
    B = correction.B[0]
    for i, (w, _, _, S_experts, quantize_s) in enumerate(sharing):
        E = len(w.Ws)
        gains = [b - a for b, a in zip(report.member_errors_before[first:first + E],
                                       report.member_errors_after[first:first + E])]
        scores = [0.0 if S_e is None or not w.n_tokens else c / w.n_tokens * removed_error(A, B, E_, S_e)
                  for A, E_, S_e, c in zip(correction.A[first:first + E], errors[first:first + E], S_experts,
                                           w.counts)]
        solved.append(_Solved(w, [correction], projection, quantize_s, solve_s if i == 0 else 0.0,
                              here if i == 0 else [], sum(report.member_errors_before[first:first + E]),
                              sum(report.member_errors_after[first:first + E]), first, len(errors) - len(here),
                              gains=gains, scores=scores))
        first += E
    return solved


def _solve_kwargs(dtype: torch.dtype, config: GlowQConfig) -> dict:
    return dict(shrinkage=config.shrinkage, mode=config.svd, oversample=config.oversample,
                power_iters=config.power_iters, seed=config.seed,
                dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def _corrections(w, qs, S, S_experts, config: GlowQConfig) -> list:
    """Each expert's own correction of weight ``w`` (a shared method on an expert's own input: its
    ``alone`` method), or none at rank 0."""
    method = CORRECTIONS[config.method]
    rank = _rank(config)
    errors = [quantization_error(W, q) for W, q in zip(w.Ws, qs)]
    kw = _solve_kwargs(w.Ws[0].dtype, config)
    if rank == 0:
        return [solve("none", errors, S if S is not None else S_experts[0], 0, **kw)]
    alone = method.alone or method.name
    r = rank if w.reads_input or config.expert_own_input_rank is None else config.expert_own_input_rank
    return [solve(alone if r else "none", [E_], S if S_e is None else S_e, min(r, *E_.shape), **kw)
            for E_, S_e in zip(errors, S_experts)]


def _install(model: nn.Module, target: QuantizedExpertWeights, done: _Solved, config: GlowQConfig,
             factor_dtype: torch.dtype) -> None:
    """Set ``done``'s correction on the installed experts weight ``target`` (and its dense members)."""
    if not _rank(config):
        return
    if done.projection is not None:
        register_projection(model, done.projection)  # under one key: every weight that reads it registers the same
        As = done.corrections[0].A
        E = len(done.w.Ws)
        target.set_correction(torch.stack(As[done.first:done.first + E]).to(factor_dtype), projection=done.projection)
        for (m, W, bias, q), A in zip(done.here, As[done.first_dense:]):
            linear = QuantizedLinear(pack(q), bias)
            replace_module(model, m, linear)
            linear.set_correction(A.to(factor_dtype), done.projection)
    elif done.corrections[0].A[0].shape[1]:  # each expert's own B (not at rank 0: expert_own_input_rank=0)
        target.set_correction(torch.stack([c.A[0] for c in done.corrections]).to(factor_dtype),
                              B=torch.stack([c.B[0] for c in done.corrections]).to(factor_dtype))


def _joined_rows(model: nn.Module, joined: Sequence[InputGroup], report, E: int, dense: list) -> dict[str, GroupReport]:
    """The joined groups' report rows (their errors from the joint solve, whose dense members start
    at ``E``; ``B`` counted in the experts' row)."""
    before, after = report.member_errors_before[E:], report.member_errors_after[E:]
    index = {m: i for i, (m, *_) in enumerate(dense)}
    rows = {}
    for g in joined:
        linears = [model.get_submodule(m) for m in g.members]
        Ws = [dense[index[m]][1] for m in g.members]
        err_sq = sum(
            float((W.double() - q.dequantized_weight(torch.float64)).pow(2).sum()) for W, q in zip(Ws, linears)
        )
        w_sq = sum(float(W.double().pow(2).sum()) for W in Ws)
        b = [before[index[m]] for m in g.members]
        a = [after[index[m]] for m in g.members]
        factor = sum(q.A.nbytes for q in linears if q.A is not None)
        rows[g.name] = GroupReport(
            name=g.name, members=g.members, in_features=g.in_features, out_features=g.out_features,
            rank=max(q.rank for q in linears), error_before=sum(b), error_after=sum(a),
            code_bytes=sum(q.qweight.nbytes for q in linears),
            scale_bytes=sum(q.scales.nbytes + q.zeros.nbytes for q in linears), factor_bytes=factor,
            dense_bytes=sum(W.numel() * W.element_size() for W in Ws), solve_time_s=0.0,
            weight_error=(err_sq / w_sq) ** 0.5 if w_sq else 0.0, restore_gain=sum(b) - sum(a),
            member_gains=tuple(x - y for x, y in zip(b, a)), candidate_factor_bytes=factor)
    return rows
