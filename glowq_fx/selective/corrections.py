"""GlowQ-S on a live quantized model: switch corrections per unit in place, and measure the
calibration loss along a ranking (what ``GlowQConfig(selective="auto")`` runs inside ``quantize_``).

The paper's code reloads and re-quantizes the model for every k. Here a fully corrected model is
quantized once; ``Corrections`` detaches and re-attaches each unit's ``A_i`` / ``B`` on the live
modules, so a point of a sweep costs one evaluation and nothing else. A unit is one
``SharedProjection``: a GlowQ group (one ``B`` shared by its members: linears, or the experts of an
MoE block's weights reading its input) or, for the independent methods, one linear; or an MoE
experts weight with each expert's own ``B``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from glowq_fx.evaluation.perplexity import token_nll
from glowq_fx.modules.experts import QuantizedExpertWeights
from glowq_fx.modules.linear import QuantizedLinear, SharedProjection
from glowq_fx.selective.knee import find_knee
from passes.groups import group_name


class Corrections:
    """Every correction of a quantized model, by unit name (``group_name`` of its members): a
    ``SharedProjection`` with its members (``QuantizedLinear``s, experts weights reading it), or an
    experts weight with each expert's own ``B``."""

    def __init__(self, model: nn.Module):
        units: dict[int, tuple[tuple[str, ...], SharedProjection | None, list]] = {}
        for name, m in model.named_modules():
            if not isinstance(m, (QuantizedLinear, QuantizedExpertWeights)) or m.A is None:
                continue
            # an experts weight whose correction GlowQ-S kept for some experts only: those experts
            experts = m.corrected_experts if getattr(m, "factor_slots", None) is not None else None
            if m.projection is not None:
                units.setdefault(id(m.projection), (m.projection.members, m.projection, []))[2].append(
                    (m, m.A, None, experts))
            else:  # an experts weight with each expert's own B: a unit of its own
                units[id(m)] = ((name,), None, [(m, m.A, m.B, experts)])
        if not units:
            raise ValueError("the model has no low-rank corrections to select from: quantize it with a correcting "
                             "method (glowq, qera, lqer, svd) and selective=None")
        self._units = {group_name(members): (members, p, held) for members, p, held in units.values()}
        self._on = set(self._units)

    @property
    def names(self) -> list[str]:
        return list(self._units)

    @property
    def enabled(self) -> set[str]:
        return set(self._on)

    def members(self, name: str) -> tuple[str, ...]:
        return self._units[name][0]

    def modules(self, name: str) -> list[nn.Module]:
        """The unit's quantized modules (``QuantizedLinear``s, experts weights), in member order."""
        return [module for module, *_ in self._units[name][2]]

    def nbytes(self, name: str) -> int:
        """Bytes of the unit's factors (its ``B`` and every member's ``A_i``)."""
        _, projection, held = self._units[name]
        shared = 0 if projection is None else projection.B.nbytes
        return shared + sum(A.nbytes + (0 if B is None else B.nbytes) for _, A, B, _ in held)

    def set(self, enabled: Iterable[str]) -> None:
        """Keep exactly the units in ``enabled`` corrected (in place)."""
        enabled = set(enabled)
        unknown = enabled - set(self._units)
        if unknown:
            raise ValueError(f"unknown correction units {sorted(unknown)[:3]}; known: {self.names[:3]} ...")
        for name, (_, projection, held) in self._units.items():
            on = name in enabled
            for module, A, B, experts in held:
                some = {} if experts is None else {"experts": experts}
                if not on:
                    module.set_correction(None, projection=None)
                elif B is not None:
                    module.set_correction(A, B=B, **some)
                else:
                    module.set_correction(A, projection=projection, **some)
        self._on = enabled

    @contextlib.contextmanager
    def restored(self) -> Iterator["Corrections"]:
        """Whatever the body switches, the units enabled on entry are enabled again on exit."""
        before = self.enabled
        try:
            yield self
        finally:
            self.set(before)


def check_lm_batch(batch) -> None:
    """A calibration batch the causal-LM loss can score, or a ValueError saying what to do."""
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), Tensor) or batch["input_ids"].dim() != 2:
        raise ValueError("the calibration loss (selective='auto', the measured score) needs batches of the form "
                         "{'input_ids': (B, T), ...} for a causal LM; for other inputs choose the corrections with a "
                         "fraction or a byte budget")


def calibration_loss(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> float:
    """Mean next-token NLL over the batches' ``input_ids`` (a causal LM returning ``.logits``);
    an ``attention_mask`` in a batch is passed on and its padded positions are not scored."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            check_lm_batch(batch)
            mask = batch.get("attention_mask")
            nll = token_nll(model, batch["input_ids"], mask)
            scored = torch.ones_like(nll, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
            total += float(nll.double()[scored].sum())
            count += int(scored.sum())
    if count == 0:
        raise ValueError("the calibration batches have no token to score (every target is padding)")
    return total / count


@dataclass
class LossPoint:
    k: int  # units corrected, the best-ranked first
    factor_bytes: int
    loss: float


def loss_curve_knee(model: nn.Module, corrections: Corrections, ranked: Sequence[Sequence[str]],
                    costs: Sequence[int], batches: Sequence[dict[str, Tensor]], points: int = 16,
                    progress: bool = False) -> tuple[int, list[LossPoint]]:
    """How many of the ``ranked`` candidates to keep: the knee of the calibration loss against the
    kept factor bytes, measured with the first ``k`` candidates corrected for ``k`` on a grid of
    about ``points`` steps (``GlowQConfig(selective="auto")``).

    A candidate is a list of unit names switched together (a group's projections), ``costs`` its
    bytes. The units enabled before are enabled again afterwards. No knee (a straight line: every
    candidate pays the same per byte) keeps them all.
    """
    from tqdm.auto import tqdm

    if len(ranked) != len(costs):
        raise ValueError(f"{len(ranked)} candidates but {len(costs)} costs")
    if points < 2:
        raise ValueError(f"points must be at least 2, got {points}")
    n = len(ranked)
    ks = default_ks(n, max(1, -(-n // points)))
    cum = [0]
    for c in costs:
        cum.append(cum[-1] + c)
    curve = []
    with corrections.restored():
        for k in tqdm(ks, desc="GlowQ-S loss curve", disable=not progress, leave=False):
            corrections.set([u for units in ranked[:k] for u in units])
            curve.append(LossPoint(k, cum[k], calibration_loss(model, batches)))
    knee = find_knee([p.factor_bytes for p in curve], [p.loss for p in curve], "convex") if cum[-1] > 0 else None
    return (n if knee is None else curve[knee].k), curve


def default_ks(n: int, step: int) -> list[int]:
    """0, step, 2 step, ... and n: the sweep's grid (every k when step is 1)."""
    if step < 1:
        raise ValueError(f"step must be positive, got {step}")
    return sorted(set(range(0, n, step)) | {n})
