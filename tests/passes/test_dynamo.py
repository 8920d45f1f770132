"""The one private Dynamo detail glowq-fx reads (graph-break reasons): fails loudly if torch moves it."""
import torch

from passes import _dynamo


def test_a_known_break_is_reported():
    def f(x):
        y = x * 2
        if y.sum() > 0:  # data-dependent branch: always a graph break
            return y + 1
        return y - 1

    before = _dynamo.break_counters()
    torch.compile(f, backend="eager")(torch.ones(3))
    reasons = _dynamo.new_break_reasons(before)
    assert reasons, "torch no longer reports graph-break reasons where passes._dynamo reads them"
    assert any("if y.sum() > 0" in r for r in reasons), reasons
