"""GlowQ-S at ``quantize_`` time: which groups keep their solved correction.

``GlowQConfig.selective`` is None (every group), a fraction of the groups or a byte budget
(decided from the report's scores, ``knee.choose_groups``), or ``"auto"``: every correction is
attached, the calibration loss is measured with the best ``k`` groups corrected for ``k`` on a
grid (``corrections.loss_curve_knee``), and the groups past the knee of loss against bytes are
detached. Groups are ranked by the whitened error their correction removes per factor byte.

Inside a kept experts correction, ``ExpertsConfig.expert_selection="per-expert"`` then drops the
factors of each expert whose own score per byte (its routing frequency times the error its
``A_e`` removes on its tokens) is below the last kept unit's: a rarely routed expert's ``A_e``
would not have been kept on its own (``drop_expert_corrections``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import torch
from torch import Tensor, nn

from glowq_fx.modules.install import attach_correction, correctable, detach_correction
from glowq_fx.report import GroupReport
from glowq_fx.selective.corrections import Corrections, calibration_loss, check_lm_batch, loss_curve_knee
from glowq_fx.selective.knee import choose_groups, ranking
from passes.groups import group_name

Factors = Sequence[tuple[tuple[str, ...], Tensor, Sequence[Tensor]]]  # (members, B, [A_i]) per unit of a group

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


def attach_group(model: nn.Module, report: GroupReport, factors: Factors) -> None:
    """Give the group its solved correction (every unit's projection and ``A_i``)."""
    for members, B, As in factors:
        attach_correction(model, members, B, As)
    report.factor_bytes = report.candidate_factor_bytes
    report.restored = True


def detach_group(model: nn.Module, report: GroupReport, factors: Factors) -> None:
    """Undo ``attach_group``."""
    for members, _, _ in factors:
        detach_correction(model, members)
    report.factor_bytes, report.restored = 0, False


def ranked_candidates(reports: list[GroupReport]) -> list[int]:
    """Indices of the groups with a correction, best first: removed whitened error per factor byte."""
    candidates = [i for i, r in enumerate(reports) if r.candidate_factor_bytes > 0]
    return [candidates[j] for j in ranking([max(reports[i].restore_gain, 0.0) for i in candidates],
                                           [reports[i].candidate_factor_bytes for i in candidates])]


def _select_by_policy(reports: list[GroupReport], policy) -> set[int]:
    """Indices of the groups whose corrections are kept (all when ``policy`` is None) for the
    policies decided from the report alone (a fraction or a byte budget)."""
    ranked = ranked_candidates(reports)
    if policy is None:
        return set(ranked)
    chosen = choose_groups([max(reports[i].restore_gain, 0.0) for i in ranked],
                           [reports[i].candidate_factor_bytes for i in ranked], policy)
    return {ranked[j] for j in chosen}


def _select_auto(model: nn.Module, reports: list[GroupReport], pending: list[Factors], batches: list,
                 progress: bool) -> tuple[set[int], dict | None]:
    """``selective="auto"``: attach every correction, measure the calibration loss with the best
    ``k`` groups corrected (ranked as ``ranked_candidates`` ranks), keep the groups up to the knee of loss
    against bytes, detach the others. Returns the kept indices and the measured curve."""
    ranked = ranked_candidates(reports)
    if not ranked:
        return set(), None
    for i in ranked:
        attach_group(model, reports[i], pending[i])
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
        detach_group(model, reports[i], pending[i])
    selection = {"policy": "auto", "ranking": "restore_gain per factor byte", "kept": k, "candidates": len(ranked),
                 "curve_tokens": sum(b["input_ids"].numel() for b in scored), "curve": [asdict(p) for p in points]}
    return set(ranked[:k]), selection


def check_auto_batches(batches: list) -> None:
    """``selective="auto"`` scores a causal LM's next-token loss: say so before any work is done."""
    if not batches:
        raise ValueError("selective='auto' measures the calibration loss, but this Calibration holds no batches; "
                         "build it with calibrate(), or choose a fraction or a byte budget")
    for b in batches:
        check_lm_batch(b)




def apply_selection(model: nn.Module, reports: list[GroupReport], factors: list[Factors], policy,
                    batches: list, progress: bool = True) -> dict | None:
    """Attach the corrections ``policy`` keeps (``GlowQConfig.selective``), mark the others
    uncorrected in their reports (their error is the quantization's, rank 0). Returns the
    measured loss curve for ``"auto"``, else None."""
    selection = None
    if policy == "auto":
        chosen, selection = _select_auto(model, reports, factors, batches, progress)
    else:
        chosen = _select_by_policy(reports, policy)
        for i in chosen:
            attach_group(model, reports[i], factors[i])
    for i, report in enumerate(reports):
        if i not in chosen:
            report.error_after, report.rank = report.error_before, 0
    return selection


def drop_expert_corrections(model: nn.Module, reports: list[GroupReport], factors: list[Factors],
                            batches: list | None = None, selection: dict | None = None) -> dict | None:
    """GlowQ-S per expert, after the units are chosen: in every kept unit, each experts weight
    drops the factors (``A_e``, and ``B_e`` where each expert has its own) of the experts whose
    score per byte (``GroupReport.member_scores``) is below the lowest score per byte among the
    kept units, the bar each unit had to pass. A unit passes it on average, so some of its experts
    (or its dense members) always stay. The rows are updated (errors, bytes, ``corrected_experts``).

    Returns what was dropped (None when no unit was kept); with ``batches`` of an ``"auto"``
    ``selection`` it also holds the calibration loss measured with the drops, beside the knee's.
    """
    chosen = [i for i, r in enumerate(reports) if r.restored and r.candidate_factor_bytes > 0]
    if not chosen:
        return None
    bar = min(max(reports[i].restore_gain, 0.0) / reports[i].candidate_factor_bytes for i in chosen)
    rows = {r.name: r for r in reports}
    dropped = experts = saved = 0
    for i in chosen:
        for members, B, As in factors[i]:
            for member, A in zip(members, As):
                row = rows.get(member)
                if A.dim() != 3 or row is None or len(row.member_scores) != A.shape[0]:
                    continue  # a dense member, or an experts weight without per-expert scores
                per_expert = A[0].nbytes + (B[0].nbytes if B.dim() == 3 else 0)
                keep = torch.tensor([score / per_expert >= bar for score in row.member_scores])
                experts += len(keep)
                row.corrected_experts = int(keep.sum())
                if bool(keep.all()):
                    continue
                module = correctable(model, member)
                if bool(keep.any()):
                    module.keep_experts(keep)
                else:
                    module.set_correction(None)
                gone = (~keep).nonzero().flatten().tolist()
                row.error_after += sum(row.member_gains[e] for e in gone)
                row.factor_bytes -= len(gone) * per_expert  # the bytes of the row's own A_e (and B_e)
                for r in {id(row): row, id(reports[i]): reports[i]}.values():  # and the unit's score
                    r.restore_gain -= sum(row.member_scores[e] for e in gone)
                dropped += len(gone)
                saved += len(gone) * per_expert
    out = {"bar": bar, "experts": experts, "dropped": dropped, "bytes_saved": saved}
    if selection is not None and batches and dropped:
        was_training = model.training
        model.eval()
        try:
            out["loss"] = calibration_loss(model, curve_batches(batches))
        finally:
            model.train(was_training)
        out["loss_at_knee"] = next(p["loss"] for p in selection["curve"] if p["k"] == selection["kept"])
    return out
