"""The GlowQ-S study, offline: score the units of a fully corrected model (``quantize_`` with
``selective=None``), sweep top-k perplexity with corrections switched in place
(``corrections.Corrections``), find the elbows, compare with lower ranks, plot.

Scores (larger = the correction matters more):
- ``"gain"``: the whitened output error the correction removes, ``tr(E S E^T) - tr(E' S E'^T)``
  summed over the members (from the quantization report; free).
- ``"weight_error"``: ``||E||_F / ||W||_F`` of the members' quantization (free; the reference
  code's choice).
- ``"measured"``: the calibration loss increase when only this unit's correction is switched off
  (one forward pass over the calibration batches per unit).

``correction_latency`` prices units in time
(``latency``), so sweeps and elbows can be read against bytes or against latency.
``rank_sweep`` is the other way to spend fewer factor bytes, every unit kept at a lower rank: the
baseline a selection has to beat.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import Tensor, nn

from glowq_fx.evaluation.perplexity import perplexity
from glowq_fx.quantize import quantize_
from glowq_fx.selective.corrections import Corrections, calibration_loss, default_ks
from glowq_fx.selective.knee import find_knee, ranking
from glowq_fx.selective.latency import LatencyModel, measure_latency

SCORES = ("gain", "weight_error", "measured")


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
        with corrections.restored():
            for name in tqdm(corrections.names, desc="measured scores", disable=not progress, leave=False):
                corrections.set(everything - {name})
                scores[name] = calibration_loss(model, batches) - base
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


def correction_latency(corrections: Corrections, *, tokens: int = 1, **kwargs) -> tuple[LatencyModel, dict[str, float]]:
    """Each unit's correction latency in ms (``latency.measure_latency``, every correction on
    while timing; the previous state is restored)."""
    with corrections.restored():
        corrections.set(corrections.names)
        model, shapes = measure_latency({n: corrections.modules(n) for n in corrections.names}, tokens=tokens,
                                        **kwargs)
    return model, {n: model.unit_ms(shapes[n]) for n in corrections.names}


@dataclass
class SweepPoint:
    k: int  # units restored, the best-ranked first
    factor_bytes: int
    perplexity: float
    latency_ms: float | None = None  # the restored units' correction latency (``correction_latency``)

    def to_dict(self) -> dict:
        return asdict(self)


def sweep(model: nn.Module, corrections: Corrections, order: Sequence[str], tokens: Tensor, ks: Sequence[int], *,
          seq_len: int = 2048, max_tokens: int | None = None, batch_size: int = 1,
          latency_ms: dict[str, float] | None = None, progress: bool = True) -> list[SweepPoint]:
    """Perplexity with the first ``k`` units of ``order`` restored, for each ``k`` in ``ks``; the
    model's corrections are switched in place and restored afterwards. With
    ``latency_ms`` (unit -> ms, from ``correction_latency``) each point also carries its latency."""
    if latency_ms is not None and set(order) - set(latency_ms):
        raise ValueError(f"latency_ms has no time for units {sorted(set(order) - set(latency_ms))[:3]}")
    points = []
    with corrections.restored():
        for k in ks:
            if not 0 <= k <= len(order):
                raise ValueError(f"k={k} is outside 0..{len(order)}")
            kept = list(order[:k])
            corrections.set(kept)
            r = perplexity(model, tokens, seq_len, batch_size=batch_size, max_tokens=max_tokens, progress=progress,
                           desc=f"k={k}")
            points.append(SweepPoint(k, sum(corrections.nbytes(n) for n in kept), r.perplexity,
                                     None if latency_ms is None else sum(latency_ms[n] for n in kept)))
    return points


def rank_sweep(model: nn.Module, calibration, config, ranks: Sequence[int], tokens: Tensor, *,
               seq_len: int = 2048, max_tokens: int | None = None, batch_size: int = 1,
               latency_tokens: int | None = None, progress: bool = True) -> dict[int, SweepPoint]:
    """Every unit restored, at each of ``ranks``: perplexity on ``tokens`` and factor bytes (and,
    with ``latency_tokens``, the summed correction latency, ``correction_latency``).

    ``model`` is the float model and stays unchanged: each rank quantizes a copy from the same
    ``calibration`` (a ``Calibration``, so ``S`` is collected once) with ``config`` at that rank.
    The points have ``k`` = all units, so they sit beside a top-k sweep's on the cost axes.
    """
    if config.selective is not None:
        raise ValueError("rank_sweep restores every unit; pass a config with selective=None")
    bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or r < 1]
    if bad:
        raise ValueError(f"ranks must be positive ints, got {bad}")
    points = {}
    for rank in ranks:
        subject = copy.deepcopy(model)
        quantize_(subject, calibration, dataclasses.replace(config, rank=rank), progress=False)
        corrections = Corrections(subject)
        r = perplexity(subject, tokens, seq_len, batch_size=batch_size, max_tokens=max_tokens, progress=progress,
                       desc=f"rank {rank}")
        latency_ms = (None if latency_tokens is None
                      else sum(correction_latency(corrections, tokens=latency_tokens)[1].values()))
        points[rank] = SweepPoint(len(corrections.names), sum(corrections.nbytes(n) for n in corrections.names),
                                  r.perplexity, latency_ms)
        del subject, corrections
    return points


COSTS = ("bytes", "latency")


def sweep_elbow(points: Sequence[SweepPoint], cost: str = "bytes") -> SweepPoint | None:
    """The knee of perplexity against the cost (a convex, decreasing curve): factor bytes, or the
    measured correction latency. Points of equal cost keep the lowest perplexity."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {list(COSTS)}, got {cost!r}")
    if cost == "latency" and any(p.latency_ms is None for p in points):
        raise ValueError("the sweep has no latencies: pass latency_ms to sweep()")
    x_of = (lambda p: p.factor_bytes) if cost == "bytes" else (lambda p: p.latency_ms)
    best: dict[float, SweepPoint] = {}
    for p in points:
        x = x_of(p)
        if x not in best or (p.perplexity, p.k) < (best[x].perplexity, best[x].k):
            best[x] = p
    pts = [best[x] for x in sorted(best)]
    knee = find_knee([x_of(p) for p in pts], [p.perplexity for p in pts], "convex")
    return None if knee is None else pts[knee]


def order_by(scores: dict[str, float], corrections: Corrections) -> list[str]:
    """Unit names by decreasing score per factor byte (``knee.ranking``)."""
    names = list(scores)
    return [names[i] for i in ranking([max(scores[n], 0.0) for n in names], [corrections.nbytes(n) for n in names])]


@dataclass
class SelectionStudy:
    """One score's ranking swept over k, with its elbows (against bytes, and against latency when
    the sweep measured it)."""

    score: str
    order: list[str]
    points: list[SweepPoint]
    elbow: SweepPoint | None
    units: int
    total_bytes: int
    latency_elbow: SweepPoint | None = None

    def to_dict(self) -> dict:
        return {"score": self.score, "order": self.order, "points": [p.to_dict() for p in self.points],
                "elbow": None if self.elbow is None else self.elbow.to_dict(),
                "latency_elbow": None if self.latency_elbow is None else self.latency_elbow.to_dict(),
                "units": self.units, "total_bytes": self.total_bytes}


def study(model: nn.Module, report, tokens: Tensor, scores: Sequence[str] = ("gain",), *, step: int = 1,
          batches: Sequence[dict[str, Tensor]] | None = None, seq_len: int = 2048, max_tokens: int | None = None,
          batch_size: int = 1, latency_ms: dict[str, float] | None = None,
          progress: bool = True) -> list[SelectionStudy]:
    """For each score: rank the units, sweep top-k perplexity on ``tokens``, find the elbows
    (against bytes, and against latency when ``latency_ms`` from ``correction_latency`` is given)."""
    corrections = Corrections(model)
    ks = default_ks(len(corrections.names), step)
    out = []
    for kind in scores:
        order = order_by(unit_scores(corrections, report, kind, model=model, batches=batches, progress=progress),
                         corrections)
        points = sweep(model, corrections, order, tokens, ks, seq_len=seq_len, max_tokens=max_tokens,
                       batch_size=batch_size, latency_ms=latency_ms, progress=progress)
        out.append(SelectionStudy(kind, order, points, sweep_elbow(points), len(order),
                                  sum(corrections.nbytes(n) for n in order),
                                  None if latency_ms is None else sweep_elbow(points, "latency")))
    return out


def plot_studies(studies: Sequence[SelectionStudy], path, title: str, latency_device: str = "",
                 marks: Sequence[tuple[str, SweepPoint]] = (), ranks: dict[int, SweepPoint] | None = None) -> None:
    """PNG: perplexity against units restored, against factor bytes and (when the sweeps measured
    it) against correction latency, elbows marked; ``marks`` are further labelled points (such as
    what ``selective="auto"`` kept), drawn as stars on every panel; ``ranks`` (``rank_sweep``) a
    dashed line of every unit at other ranks on the cost panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_latency = all(p.latency_ms is not None for st in studies for p in st.points)
    panels = [("k", "groups restored (best first)", lambda p: p.k, "elbow"),
              ("bytes", "correction factors (MB, model dtype)", lambda p: p.factor_bytes / 2**20, "elbow")]
    if with_latency:
        panels.append(("latency", f"correction latency per token (ms, {latency_device or 'measured'})",
                       lambda p: p.latency_ms, "latency_elbow"))
    fig = Figure(figsize=(5.5 * len(panels), 4.2))  # no pyplot: no global state
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    for st in studies:
        color = None
        for ax, (kind, _, x_of, elbow_field) in zip(axes, panels):
            line = ax.plot([x_of(p) for p in st.points], [p.perplexity for p in st.points], marker=".",
                           color=color, label=st.score)[0]
            color = line.get_color()
            elbow = getattr(st, elbow_field)
            if elbow is not None:
                ax.scatter([x_of(elbow)], [elbow.perplexity], s=90, facecolors="none", edgecolors=color,
                           label=f"elbow ({st.score}): k={elbow.k}" if kind != "k" else None)
    for ax, (kind, _, x_of, _) in zip(axes, panels):
        if kind == "k" or not ranks or (kind == "latency" and any(p.latency_ms is None for p in ranks.values())):
            continue
        order = sorted(ranks)
        xs, ys = [x_of(ranks[r]) for r in order], [ranks[r].perplexity for r in order]
        ax.plot(xs, ys, linestyle="--", marker="s", markersize=4, color="gray", label="every group, other ranks")
        for r, x, y in zip(order, xs, ys):
            ax.annotate(f"r{r}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color="gray")
    for label, point in marks:
        for ax, (kind, _, x_of, _) in zip(axes, panels):
            if kind != "latency" or point.latency_ms is not None:
                ax.scatter([x_of(point)], [point.perplexity], marker="*", s=140, color="black", zorder=3,
                           label=f"{label}: k={point.k}")
    for ax, (_, xlabel, _, _) in zip(axes, panels):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
