"""selective.knee: Kneedle on curves with known knees, ranking, fractions and byte budgets."""
import math
import random

import pytest

from glowq_fx.selective.knee import choose_groups, find_knee, ranking


@pytest.mark.parametrize("corner", [3, 7, 12])
def test_piecewise_linear_knee_is_the_corner(corner):
    # steep rise to the corner, then a gentle slope: the corner is the knee, whatever the scale
    scale = random.uniform(0.1, 1000)
    x = list(range(20))
    y = [scale * (10 * i if i <= corner else 10 * corner + 0.5 * (i - corner)) for i in x]
    assert find_knee(x, y, "concave") == corner
    # the same shape mirrored: a steep drop that flattens (perplexity against groups restored)
    assert find_knee(x, [-v for v in y], "convex") == corner


def test_knee_of_smooth_curves_matches_kneed():
    kneed = pytest.importorskip("kneed")
    x = [i / 10 for i in range(1, 101)]
    for y, curve, direction in [([math.log(v) for v in x], "concave", "increasing"),
                                ([1 / v for v in x], "convex", "decreasing"),
                                ([1 - math.exp(-v) for v in x], "concave", "increasing")]:
        expected = kneed.KneeLocator(x, y, curve=curve, direction=direction).knee
        assert x[find_knee(x, y, curve)] == pytest.approx(expected)


def test_lines_have_no_knee_and_bad_input_is_named():
    assert find_knee([0, 1, 2, 3], [0, 2, 4, 6]) is None
    assert find_knee([0, 1, 2], [5, 5, 5]) is None
    assert find_knee([0, 1], [0, 1]) is None
    with pytest.raises(ValueError, match="strictly increasing"):
        find_knee([0, 2, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="one length"):
        find_knee([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="curve must be"):
        find_knee([0, 1, 2], [0, 1, 2], "wavy")


def test_ranking_is_by_score_per_byte():
    assert ranking([10, 10, 1], [1, 2, 1]) == [0, 1, 2]
    assert ranking([1, 8, 3], [1, 2, 1]) == [1, 2, 0]  # 4 and 3 per byte before 1
    with pytest.raises(ValueError, match="positive"):
        ranking([1], [0])


def test_policies():
    rng = random.Random()
    n = 40
    costs = [rng.choice([100, 300]) for _ in range(n)]
    # a few groups carry most of the benefit (as measured on real models: deep layers, MLP inputs)
    scores = [c * (50.0 if i < 6 else 1.0) * rng.uniform(0.9, 1.1) for i, c in enumerate(costs)]
    assert sorted(choose_groups(scores, costs, 6 / n)) == list(range(6))  # the dense six rank first
    half = choose_groups(scores, costs, 0.5)
    assert len(half) == 20 and half == ranking(scores, costs)[:20]
    budget = 2000
    kept = choose_groups(scores, costs, budget)
    assert sum(costs[i] for i in kept) <= budget
    assert all(costs[i] + sum(costs[j] for j in kept) > budget for i in set(range(n)) - set(kept))
    assert choose_groups(scores, costs, 1.0) == ranking(scores, costs)
    for bad in (0.0, 1.5, -3, "most", True, "auto"):
        with pytest.raises(ValueError):
            choose_groups(scores, costs, bad)
