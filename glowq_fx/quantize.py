"""``quantize_(model, calibration, GlowQConfig())``: the one verb before ``torch.compile``.

1. Capture the model's graph on the first calibration batch and find its input-sharing groups
   (``capture.groups.find_groups``; no per-architecture config).
2. Run every calibration batch once, accumulating one ``S = E[x x^T]`` per group from a
   pre-hook on the group's first member. Activations are never kept: the extra memory is the
   groups' ``S`` (d_in^2 each) plus one group's work while it is quantized.
3. Per group: quantize each member (RTN, or GPTQ driven by the same ``S``), solve the
   correction (``correction.decompose.solve``: GlowQ's shared ``B``, or QERA / LQER / SVD per member),
   and swap each member for a ``QuantizedLinear`` in place (``modules.install``); GlowQ-S decides
   which groups keep their correction (``selective.policy``). The group's ``SharedProjection``
   is registered once, under ``glowq_projections`` of the members' closest common ancestor.

Steps 1-2 are ``calibration.calibrate``; its ``Calibration`` can be passed to ``quantize_``
instead of the batches, so that several methods or ranks share one calibration run (the accuracy
benchmark does).

Ranks are capped at what a group's error can hold: ``min(rank, in_features, sum d_out)`` for
the shared ``B``, ``min(rank, in_features, d_out_i)`` per member for independent methods;
the report gives the rank each group got.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from glowq_fx._console import progress_bar
from glowq_fx.calibration.calibrate import Calibration, calibrate
from glowq_fx.capture.run import Run, run_batch
from glowq_fx.config import GlowQConfig, as_config
from glowq_fx.correction.decompose import solve
from glowq_fx.kernels.layout import pack
from glowq_fx.modules.install import replace_module
from glowq_fx.modules.linear import QuantizedLinear, linear_weight
from glowq_fx.quant import quantization_error, quantize_gptq, quantize_rtn
from glowq_fx.report import GroupReport, QuantizationReport
from glowq_fx.selective.policy import apply_selection, check_auto_batches
from passes.groups import InputGroup


def _quantize_group(model: nn.Module, modules: dict[str, nn.Module], g: InputGroup, S: torch.Tensor,
                    config: GlowQConfig) -> tuple[GroupReport, list]:
    """Quantize the group's members in place (uncorrected) and solve its correction; the factors
    come back pending, to be attached once GlowQ-S has chosen (``selective.policy``)."""
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
        replace_module(model, name, qlinear)
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
        run: ``run(model, batch)`` does one forward pass (default ``capture.run.run_batch``).
        progress: show tqdm bars over calibration batches and over groups.

    Returns:
        ``QuantizationReport``; ``print(report)`` shows the per-group table.
    """
    t0 = time.perf_counter()
    config = as_config(config)
    if isinstance(calibration, Calibration):
        if groups is not None:
            raise ValueError("pass groups to calibrate(), not to quantize_() with a Calibration")
        calibration.check_belongs_to(model)
        calibrated, reused = calibration, True
    else:
        calibrated, reused = calibrate(model, calibration, config, groups=groups, run=run, progress=progress), False
    if config.selective == "auto":
        check_auto_batches(calibrated.batches)
    modules = dict(model.named_modules())
    rows, factors = [], []
    with torch.no_grad():
        for g in progress_bar(progress, "groups", len(calibrated.groups))(calibrated.groups):
            S = calibrated.statistics[g.name].value() if reused else calibrated.statistics.pop(g.name)
            row, solved = _quantize_group(model, modules, g, S, config)
            rows.append(row)
            factors.append(solved)
        selection = apply_selection(model, rows, factors, config.selective, calibrated.batches, progress)
    return QuantizationReport(config, rows, dict(calibrated.skipped), list(calibrated.graph_breaks),
                              calibrated.n_batches, calibrated.n_tokens, time.perf_counter() - t0, selection)
