"""glowq_fx._checks.all_finite: NaN and Inf are found; a finite tensor whose sum overflows is finite."""
import torch

from glowq_fx._checks import all_finite


def test_all_finite_tells_an_overflowing_sum_from_a_nan_or_inf(gen):
    x = torch.randn(64, 48, generator=gen)
    assert all_finite(x)
    big = torch.full((4, 4), torch.finfo(torch.float32).max)
    assert not torch.isfinite(big.sum()) and all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[17, 5] = bad
        assert not all_finite(y)
    assert not all_finite(big.clone().index_fill_(0, torch.tensor([2]), float("nan")))
