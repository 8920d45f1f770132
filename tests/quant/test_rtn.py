import pytest
import torch

from glowq_fx.quant import group_geometry, quantization_error, quantize_rtn


def _expand(grid: torch.Tensor, g: int, K: int) -> torch.Tensor:
    return grid.float().repeat_interleave(g, dim=1)[:, :K]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("K", [576, 200, 37])
@pytest.mark.parametrize("symmetric", [False, True])
def test_error_at_most_half_a_step(dtype, group_size, K, symmetric, gen):
    W = (torch.randn(19, K, generator=gen) * torch.rand(19, 1, generator=gen) * 3).to(dtype)
    W[3, 5] = 40.0  # an outlier
    qw = quantize_rtn(W, group_size, symmetric=symmetric)
    g, n_groups = group_geometry(K, group_size)
    assert qw.codes.shape == (19, g * n_groups) and qw.scales.shape == (19, n_groups)
    assert qw.scales.dtype == dtype and qw.zeros.dtype == dtype
    assert int(qw.codes.max()) <= 15
    E = quantization_error(W, qw)
    step = _expand(qw.scales, g, K)
    # s/2 is reached exactly at ties (w/s = 7.5 when symmetric); 1e-5 covers float32 rounding only
    assert (E.abs() <= step / 2 * (1 + 1e-5)).all()
    assert (qw.zeros.float() == qw.zeros.float().round()).all()


@pytest.mark.parametrize("group_size, K", [(64, 576), (128, 576), (-1, 37), (32, 45)])
def test_padding_columns_dequantize_to_zero(group_size, K, gen):
    W = torch.randn(7, K, generator=gen, dtype=torch.float16)
    qw = quantize_rtn(W, group_size)
    pad = qw.codes[:, K:].float()
    assert pad.shape[1] == qw.codes.shape[1] - K
    assert torch.equal(pad, qw.zeros[:, -1:].float().expand_as(pad))
    full = (qw.codes.float().view(7, -1, qw.group_size) - qw.zeros.float()[..., None]) * qw.scales.float()[..., None]
    assert (full.reshape(7, -1)[:, K:] == 0).all()


def _slow_rtn_codes(W: torch.Tensor, g: int, symmetric: bool) -> torch.Tensor:
    """One group at a time, float32 scalars: the textbook min/max recipe."""
    N, K = W.shape
    codes = []
    for n in range(N):
        row = []
        for start in range(0, K, g):
            w = W[n, start : start + g].float()
            if symmetric:
                s = w.abs().max() / 7.5
                z = torch.tensor(8.0)
            else:
                lo, hi = torch.clamp(w.min(), max=0), torch.clamp(w.max(), min=0)
                s = (hi - lo) / 15
                z = torch.clamp(torch.round(-lo / s), 0, 15)
            row.append(torch.clamp(torch.round(w / s) + z, 0, 15))
        codes.append(torch.cat(row))
    return torch.stack(codes)


@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_slow_reference_bit_exact(symmetric, gen):
    W = torch.randn(5, 128, generator=gen)
    qw = quantize_rtn(W, 32, symmetric=symmetric)
    assert torch.equal(qw.codes.float(), _slow_rtn_codes(W, 32, symmetric))


@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_groups_are_exact(symmetric):
    W = torch.zeros(3, 64, dtype=torch.float16)
    W[0, 40] = 1.0
    qw = quantize_rtn(W, 32, symmetric=symmetric)
    deq = qw.dequantize()
    assert (deq[1:] == 0).all() and (deq[0, :32] == 0).all()
    assert (qw.scales[1:] == 1).all()  # an empty range gets scale 1, never 0 or NaN


@pytest.mark.parametrize(
    "W, kwargs, words",
    [
        (torch.randn(4, 64), {"bits": 3}, "bits=3"),
        (torch.randn(4, 64), {"group_size": 100}, "group_size=100"),
        (torch.randn(64), {}, "2-D weight"),
        (torch.randint(0, 5, (4, 64)), {}, "floating-point"),
        (torch.full((4, 64), float("nan")), {}, "NaN"),
    ],
)
def test_bad_inputs_raise(W, kwargs, words):
    with pytest.raises(ValueError, match=words):
        quantize_rtn(W, **kwargs)


def test_error_shape_mismatch_raises(gen):
    qw = quantize_rtn(torch.randn(4, 64, generator=gen), 32)
    with pytest.raises(ValueError, match="does not match"):
        quantization_error(torch.randn(4, 65), qw)
