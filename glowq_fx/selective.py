"""GlowQ-S on a quantized model: switch corrections per group in place, score them, sweep top-k.

The paper's code reloads and re-quantizes the model for every k. Here a fully corrected model
(``quantize_`` with ``selective=None``) is quantized once; ``Corrections`` detaches and
re-attaches each group's ``A_i`` / ``B`` on the live modules, so a sweep costs one perplexity
evaluation per point and nothing else.

A unit is one ``SharedProjection``: a GlowQ group (one ``B`` shared by its members) or, for the
independent methods, one linear.

Scores (larger = the correction matters more):
- ``"gain"``: the whitened output error the correction removes, ``tr(E S E^T) - tr(E' S E'^T)``
  summed over the members (from the quantization report; free).
- ``"weight_error"``: ``||E||_F / ||W||_F`` of the members' quantization (free; the reference
  code's choice).
- ``"measured"``: the calibration loss increase when only this unit's correction is switched off
  (one forward pass over the calibration batches per unit).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from glowq_fx.evaluate import perplexity, window_nll
from glowq_fx.modules.linear import QuantizedLinear, SharedProjection
from glowq_fx.select import find_knee, ranking
from passes.grouping import group_name

SCORES = ("gain", "weight_error", "measured")


class Corrections:
    """Every correction of a quantized model, by unit name (``group_name`` of its members)."""

    def __init__(self, model: nn.Module):
        units: dict[int, tuple[SharedProjection, list[tuple[QuantizedLinear, Tensor]]]] = {}
        for m in model.modules():
            if isinstance(m, QuantizedLinear) and m.projection is not None:
                units.setdefault(id(m.projection), (m.projection, []))[1].append((m, m.A))
        if not units:
            raise ValueError("the model has no low-rank corrections to select from: quantize it with a correcting "
                             "method (glowq, qera, lqer, svd) and selective=None")
        self._units = {group_name(p.members): (p, members) for p, members in units.values()}
        self._on = set(self._units)

    @property
    def names(self) -> list[str]:
        return list(self._units)

    @property
    def enabled(self) -> set[str]:
        return set(self._on)

    def members(self, name: str) -> tuple[str, ...]:
        return self._units[name][0].members

    def nbytes(self, name: str) -> int:
        """Bytes of the unit's factors (its ``B`` and every member's ``A_i``), in the model dtype."""
        projection, members = self._units[name]
        return projection.B.nbytes + sum(A.nbytes for _, A in members)

    def set(self, enabled: Iterable[str]) -> None:
        """Keep exactly the units in ``enabled`` corrected (in place)."""
        enabled = set(enabled)
        unknown = enabled - set(self._units)
        if unknown:
            raise ValueError(f"unknown correction units {sorted(unknown)[:3]}; known: {self.names[:3]} ...")
        for name, (projection, members) in self._units.items():
            for module, A in members:
                if name in enabled:
                    module.set_correction(A, projection)
                else:
                    module.set_correction(None, None)
        self._on = enabled


def calibration_loss(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> float:
    """Mean next-token NLL over the calibration batches' ``input_ids``."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            ids = batch["input_ids"]
            total += float(window_nll(model, ids).double().sum())
            count += ids.shape[0] * (ids.shape[1] - 1)
    return total / count


def unit_scores(corrections: Corrections, report, kind: str = "gain", *, model: nn.Module | None = None,
                batches: Sequence[dict[str, Tensor]] | None = None, progress: bool = True) -> dict[str, float]:
    """One score per unit (see the module docstring); ``report`` is ``quantize_``'s report."""
    from tqdm.auto import tqdm

    if kind not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {kind!r}")
    if kind == "measured":
        if model is None or not batches:
            raise ValueError("the measured score needs the model and calibration batches")
        everything = corrections.enabled
        base = calibration_loss(model, batches)
        scores = {}
        try:
            for name in tqdm(corrections.names, desc="measured scores", disable=not progress, leave=False):
                corrections.set(everything - {name})
                scores[name] = calibration_loss(model, batches) - base
        finally:
            corrections.set(everything)
        return scores
    gain, weight_error = {}, {}
    for g in report.groups:
        for i, member in enumerate(g.members):
            gain[member] = g.member_gains[i] if g.member_gains else 0.0
            weight_error[member] = g.weight_error
    scores = {}
    for name in corrections.names:
        members = corrections.members(name)
        missing = [m for m in members if m not in gain]
        if missing:
            raise ValueError(f"the report does not describe {missing[0]}: pass the report of this model's quantize_")
        scores[name] = (sum(max(gain[m], 0.0) for m in members) if kind == "gain"
                        else max(weight_error[m] for m in members))
    return scores


@dataclass
class SweepPoint:
    k: int  # units restored, the best-ranked first
    factor_bytes: int
    perplexity: float

    def to_dict(self) -> dict:
        return asdict(self)


def sweep(model: nn.Module, corrections: Corrections, order: Sequence[str], tokens: Tensor, ks: Sequence[int], *,
          seq_len: int = 2048, max_tokens: int | None = None, batch_size: int = 1,
          progress: bool = True) -> list[SweepPoint]:
    """Perplexity with the first ``k`` units of ``order`` restored, for each ``k`` in ``ks``; the
    model's corrections are switched in place and restored to all-on afterwards."""
    everything = corrections.enabled
    points = []
    try:
        for k in ks:
            if not 0 <= k <= len(order):
                raise ValueError(f"k={k} is outside 0..{len(order)}")
            kept = list(order[:k])
            corrections.set(kept)
            r = perplexity(model, tokens, seq_len, batch_size=batch_size, max_tokens=max_tokens, progress=progress,
                           desc=f"k={k}")
            points.append(SweepPoint(k, sum(corrections.nbytes(n) for n in kept), r.perplexity))
    finally:
        corrections.set(everything)
    return points


def sweep_elbow(points: Sequence[SweepPoint]) -> SweepPoint | None:
    """The knee of perplexity against factor bytes (a convex, decreasing curve)."""
    pts = sorted(points, key=lambda p: p.factor_bytes)
    knee = find_knee([p.factor_bytes for p in pts], [p.perplexity for p in pts], "convex")
    return None if knee is None else pts[knee]


def order_by(scores: dict[str, float], corrections: Corrections) -> list[str]:
    """Unit names by decreasing score per factor byte (``select.ranking``)."""
    names = list(scores)
    return [names[i] for i in ranking([max(scores[n], 0.0) for n in names], [corrections.nbytes(n) for n in names])]


@dataclass
class SelectionStudy:
    """One score's ranking swept over k, with its elbow; ``full`` / ``none`` are the sweep's ends."""

    score: str
    order: list[str]
    points: list[SweepPoint]
    elbow: SweepPoint | None
    units: int
    total_bytes: int

    def to_dict(self) -> dict:
        return {"score": self.score, "order": self.order, "points": [p.to_dict() for p in self.points],
                "elbow": None if self.elbow is None else self.elbow.to_dict(), "units": self.units,
                "total_bytes": self.total_bytes}


def default_ks(n: int, step: int) -> list[int]:
    """0, step, 2 step, ... and n: the sweep's grid (every k when step is 1)."""
    if step < 1:
        raise ValueError(f"step must be positive, got {step}")
    return sorted(set(range(0, n, step)) | {n})


def study(model: nn.Module, report, tokens: Tensor, scores: Sequence[str] = ("gain",), *, step: int = 1,
          batches: Sequence[dict[str, Tensor]] | None = None, seq_len: int = 2048, max_tokens: int | None = None,
          batch_size: int = 1, progress: bool = True) -> list[SelectionStudy]:
    """For each score: rank the units, sweep top-k perplexity on ``tokens``, find the elbow."""
    corrections = Corrections(model)
    ks = default_ks(len(corrections.names), step)
    out = []
    for kind in scores:
        order = order_by(unit_scores(corrections, report, kind, model=model, batches=batches, progress=progress),
                         corrections)
        points = sweep(model, corrections, order, tokens, ks, seq_len=seq_len, max_tokens=max_tokens,
                       batch_size=batch_size, progress=progress)
        out.append(SelectionStudy(kind, order, points, sweep_elbow(points), len(order),
                                  sum(corrections.nbytes(n) for n in order)))
    return out


def plot_studies(studies: Sequence[SelectionStudy], path, title: str) -> None:
    """PNG: perplexity against units restored (left) and against factor bytes (right), elbows marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))  # no pyplot: no global state
    FigureCanvasAgg(fig)
    by_k, by_bytes = fig.subplots(1, 2)
    for st in studies:
        ks = [p.k for p in st.points]
        mb = [p.factor_bytes / 2**20 for p in st.points]
        ppl = [p.perplexity for p in st.points]
        line = by_k.plot(ks, ppl, marker=".", label=st.score)[0]
        by_bytes.plot(mb, ppl, marker=".", color=line.get_color(), label=st.score)
        if st.elbow is not None:
            by_k.scatter([st.elbow.k], [st.elbow.perplexity], s=90, facecolors="none", edgecolors=line.get_color())
            by_bytes.scatter([st.elbow.factor_bytes / 2**20], [st.elbow.perplexity], s=90, facecolors="none",
                             edgecolors=line.get_color(), label=f"elbow ({st.score}): k={st.elbow.k}")
    by_k.set_xlabel("groups restored (best first)")
    by_bytes.set_xlabel("correction factors (MB, model dtype)")
    for ax in (by_k, by_bytes):
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
