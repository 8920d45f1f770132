"""GlowQ-S: which groups' corrections to keep, with the elbow found automatically.

The paper ranks units, re-evaluates the model once per top-k and leaves the elbow of the
accuracy-vs-cost curve to the eye. Here:

- ``find_knee``: Kneedle (Satopää et al., 2011) in its offline form. Both axes are normalized
  to [0, 1]; the knee is the point farthest (vertically) from the chord joining the curve's
  ends, on the side the curve's shape says (above it for a concave curve, below for a convex
  one). A straight line has no knee (None).
- ``choose_groups``: groups ranked by score per correction byte; a fraction keeps that share of
  the groups, a byte budget the best groups that fit.

``GlowQConfig(selective="auto")`` does not decide from the scores alone: it measures the
calibration loss along this ranking and takes the knee of that curve
(``corrections.loss_curve_knee``). A knee of the cumulative score was tried first and measured
poorly: the whitened error is in each layer's own output units (on SmolLM2 the down
projections of layers 11, 28 and 29 hold 81% of the total), so its curve turned after 6 of
120 groups while the perplexity kept falling (the first ``benchmarks/results/selective.md``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

CURVES = ("concave", "convex")


def find_knee(x: Sequence[float], y: Sequence[float], curve: str = "concave") -> int | None:
    """Index of the knee of ``y(x)`` (``x`` strictly increasing), or None when there is none.

    ``curve="concave"``: diminishing returns (accuracy gained against cost, increasing or
    decreasing); ``"convex"``: a steep drop that flattens (e.g. perplexity against groups restored).
    """
    if curve not in CURVES:
        raise ValueError(f"curve must be one of {list(CURVES)}, got {curve!r}")
    xs = torch.as_tensor(x, dtype=torch.float64)
    ys = torch.as_tensor(y, dtype=torch.float64)
    if xs.dim() != 1 or xs.shape != ys.shape:
        raise ValueError(f"x and y must be 1-D of one length, got {tuple(xs.shape)} and {tuple(ys.shape)}")
    if not (torch.isfinite(xs).all() and torch.isfinite(ys).all()):
        raise ValueError("x and y must be finite")
    if xs.numel() < 3:
        return None
    if not (xs[1:] > xs[:-1]).all():
        raise ValueError("x must be strictly increasing")
    x_n = (xs - xs[0]) / (xs[-1] - xs[0])
    span = ys.max() - ys.min()
    if span == 0:
        return None
    y_n = (ys - ys.min()) / span
    chord = y_n[0] + (y_n[-1] - y_n[0]) * x_n
    distance = (y_n - chord) if curve == "concave" else (chord - y_n)
    best = int(torch.argmax(distance))
    return best if distance[best] > 1e-12 else None


def ranking(scores: Sequence[float], costs: Sequence[float]) -> list[int]:
    """Indices by decreasing score per unit cost (ties: larger score first, then index)."""
    if len(scores) != len(costs):
        raise ValueError(f"{len(scores)} scores but {len(costs)} costs")
    if any(c <= 0 for c in costs):
        raise ValueError("every cost must be positive")
    if any(s < 0 for s in scores):
        raise ValueError("scores must be non-negative")
    return sorted(range(len(scores)), key=lambda i: (-scores[i] / costs[i], -scores[i], i))


def choose_groups(scores: Sequence[float], costs: Sequence[float], policy: float | int) -> list[int]:
    """Indices (in ranking order) of the groups whose corrections are kept.

    Args:
        scores: benefit of each group's correction (e.g. the whitened error it removes).
        costs: bytes of each group's correction factors.
        policy: a float in (0, 1] (that fraction of the groups, rounded up), or an int (a byte
            budget).
    """
    order = ranking(scores, costs)
    if isinstance(policy, float):
        if not 0 < policy <= 1:
            raise ValueError(f"a fraction of groups must lie in (0, 1], got {policy}")
        k = -(-len(order) * policy // 1)  # ceil without float surprises on exact products
        return order[: int(k)]
    if isinstance(policy, int) and not isinstance(policy, bool):
        if policy < 0:
            raise ValueError(f"a byte budget must be >= 0, got {policy}")
        kept, spent = [], 0
        for i in order:  # greedy by value density: the classic knapsack approximation
            if spent + costs[i] <= policy:
                kept.append(i)
                spent += costs[i]
        return kept
    raise ValueError(f"choose_groups takes a fraction in (0, 1] or a byte budget (int), got {policy!r}; "
                     "selective='auto' is decided by quantize_ from a measured loss curve")
