"""The grouped experts kernel (``kernels.w4a16_experts``) against a float64 reference, in Triton's
interpreter on a CPU machine (conftest), compiled on a GPU: rows sorted by expert, odd row counts,
experts with no rows, rows past the last expert, every autotune configuration. The output is
poisoned with NaN before the launch: the launcher zero-fills it, the kernel writes every expert's
rows. Tolerance as in test_w4a16 (its docstring)."""
import pytest
import torch

from glowq_fx.kernels import launch
from tests.kernels.test_w4a16 import DEVICE, UNIT_ROUNDOFF, reference
from tests_helpers import every_config, only_config, packed_member


def _check(counts, K, N, group_size, dtype, rank, bias, gen, extra_rows=2, block_m=None):
    E = len(counts)
    members = [packed_member(N, K, group_size, dtype, rank, bias, gen, DEVICE) for _ in range(E)]
    q, s, z = (torch.stack([m[i] for m in members]) for i in range(3))
    b = torch.stack([m[3] for m in members]) if bias else None
    A = torch.stack([m[4] for m in members]) if rank else None
    M = sum(counts) + extra_rows
    x = torch.randn(M, K, generator=gen).to(dtype).to(DEVICE)
    R = torch.randn(M, rank, generator=gen).to(dtype).to(DEVICE) if rank else None
    offsets = torch.tensor(counts, device=DEVICE).cumsum(0)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    y = launch.launch_w4a16_experts(x, offsets, q, s, z, b, A, R, out=out, block_m=block_m)
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
    u, lo = UNIT_ROUNDOFF[dtype], 0
    for e, n in enumerate(counts):
        ref, spread = reference(x[lo:lo + n], members[e], None if R is None else R[lo:lo + n])
        err = (y[lo:lo + n].double() - ref).abs()
        worst = (err / (2 * u * ref.abs() + 8 * u * spread)).max().item() if n else 0.0
        assert worst <= 1, f"expert {e} ({n} rows): error {worst:.2f}x the tolerance"
        lo += n
    assert (y[lo:] == 0).all()  # rows no expert serves


CASES = [
    # row counts per expert,   K,    N, group, rank, bias
    ([3, 0, 5, 1], 200, 37, 32, 5, True),
    ([0, 0, 17, 0, 2], 136, 24, 64, 0, False),  # one expert holds every row, a row block and a bit
    ([1, 1, 1, 1, 1, 1, 1, 1], 264, 40, 128, 16, True),  # decode: one row per expert
    ([40, 9], 100, 50, -1, 3, False),  # per-channel
    ([0, 0, 0], 64, 16, 32, 4, True),  # no rows at all for any expert: everything stays zero
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("counts,K,N,group,rank,bias", CASES)
def test_grouped_experts_kernel_matches_float64(counts, K, N, group, rank, bias, dtype, gen):
    _check(counts, K, N, group, dtype, rank, bias, gen)


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_rows_per_tile_do_not_change_the_result(block_m, gen):
    _check([70, 3, 0, 33], 128, 40, 32, torch.float16, 8, True, gen, block_m=block_m)


# each autotuned kernel: module attribute -> (its raw kernel, configurations, key); the inputs
# below cross partial tiles of every configuration
KERNELS = {"experts_kernel": ("_w4a16_experts_kernel", "EXPERTS_CONFIGS", "EXPERTS_KEY"),
           "projection_kernel": ("_experts_projection_kernel", "PROJECTION_CONFIGS", "PROJECTION_KEY")}


def _every_config():
    from glowq_fx.kernels import w4a16_experts as kernels

    return every_config(kernels, KERNELS)


@pytest.mark.parametrize("attr,index", _every_config())
def test_every_autotune_configuration_is_right(attr, index, gen, monkeypatch):
    import triton

    from glowq_fx.kernels import w4a16_experts as kernels

    raw, configs, key = KERNELS[attr]
    only_config(monkeypatch, kernels, attr, raw, configs, index, getattr(kernels, key))
    try:
        if attr == "experts_kernel":
            _check([5, 0, 21, 2], 1100, 40, 32, torch.float16, 8, True, gen)  # a partial last K tile
            _check([3, 1], 2048, 24, -1, torch.bfloat16, 5, False, gen)  # per-channel: one group longer than a K tile
        else:
            _check_projection([5, 0, 21, 2], 300, 70, torch.float16, gen)  # partial K and rank tiles
    except triton.runtime.errors.OutOfResources as exc:  # compiled on a GPU only; its autotuner skips it too
        pytest.skip(f"this configuration does not fit this GPU: {exc}")


def test_the_op_runs_the_kernel_on_cuda_and_the_reference_elsewhere(gen):
    from glowq_fx import ops

    members = [packed_member(24, 64, 32, torch.float16, 4, True, gen, DEVICE) for _ in range(3)]
    q, s, z, b, A = (torch.stack([m[i] for m in members]) for i in range(5))
    x = torch.randn(9, 64, generator=gen).to(torch.float16).to(DEVICE)
    R = torch.randn(9, 4, generator=gen).to(torch.float16).to(DEVICE)
    offsets = torch.tensor([4, 4, 8], device=DEVICE)
    got = ops.w4a16_experts(x, offsets, q, s, z, b, A, R)
    kernel = launch.launch_w4a16_experts(x, offsets, q, s, z, b, A, R)
    reference = ops.reference_experts(x, offsets, q, s, z, b, A, R)
    torch.testing.assert_close(got, kernel if DEVICE == "cuda" else reference, rtol=0, atol=0)
    torch.testing.assert_close(kernel.float(), reference.float(), rtol=2e-2, atol=2e-2)


def _check_projection(counts, K, rank, dtype, gen, extra_rows=2, block_m=None):
    """The grouped projection against float64: each expert's rows times its own ``B_e^T``, rows
    past the last expert zero, the NaN-poisoned output fully written."""
    E = len(counts)
    B = (torch.randn(E, rank, K, generator=gen) / K**0.5).to(dtype).to(DEVICE)
    M = sum(counts) + extra_rows
    x = torch.randn(M, K, generator=gen).to(dtype).to(DEVICE)
    offsets = torch.tensor(counts, device=DEVICE).cumsum(0)
    out = torch.full((M, rank), float("nan"), dtype=dtype, device=DEVICE)
    R = launch.launch_experts_projection(x, offsets, B, out=out, block_m=block_m)
    assert R.data_ptr() == out.data_ptr() and not torch.isnan(R).any()
    u, lo = UNIT_ROUNDOFF[dtype], 0
    for e, n in enumerate(counts):
        xe = x[lo:lo + n].double()
        ref, spread = xe @ B[e].double().T, ((xe**2) @ (B[e].double() ** 2).T).sqrt()
        err = (R[lo:lo + n].double() - ref).abs()
        worst = (err / (2 * u * ref.abs() + 8 * u * spread)).max().item() if n else 0.0
        assert worst <= 1, f"expert {e} ({n} rows): error {worst:.2f}x the tolerance"
        lo += n
    assert (R[lo:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("counts,K,rank", [([3, 0, 5, 1], 200, 5), ([0, 0, 17, 0, 2], 136, 24),
                                           ([1] * 8, 264, 16), ([40, 9], 100, 40), ([0, 0, 0], 64, 4)])
def test_grouped_experts_projection_matches_float64(counts, K, rank, dtype, gen):
    _check_projection(counts, K, rank, dtype, gen)


@pytest.mark.parametrize("block_m", [16, 64])
def test_projection_rows_per_tile_do_not_change_the_result(block_m, gen):
    _check_projection([70, 3, 0, 33], 96, 8, torch.float16, gen, block_m=block_m)


def test_the_projection_op_runs_the_kernel_on_cuda_and_the_loop_elsewhere(gen):
    from glowq_fx import ops

    B = torch.randn(3, 4, 64, generator=gen).to(torch.float16).to(DEVICE)
    x = torch.randn(9, 64, generator=gen).to(torch.float16).to(DEVICE)
    offsets = torch.tensor([4, 4, 8], device=DEVICE)
    got = ops.experts_projection(x, offsets, B)
    kernel = launch.launch_experts_projection(x, offsets, B)
    loop = torch.cat([x[:4] @ B[0].T, x[4:8] @ B[2].T, x.new_zeros(1, 4)])
    torch.testing.assert_close(got, kernel if DEVICE == "cuda" else loop, rtol=0, atol=0)
    torch.testing.assert_close(kernel.float(), loop.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_slots_give_each_expert_its_row_of_the_factors_or_none(dtype, gen):
    """GlowQ-S kept some experts' corrections: ``A`` and ``B`` hold those rows only, ``slots``
    maps each expert to its row (-1: none). The kernels equal the full stack in which the dropped
    experts' factors are zero, and the reference loop equals the kernels."""
    from glowq_fx import ops

    E, N, K, rank = 5, 40, 96, 6
    members = [packed_member(N, K, 32, dtype, rank, True, gen, DEVICE) for _ in range(E)]
    q, s, z, b, A = (torch.stack([m[i] for m in members]) for i in range(5))
    B = (torch.randn(E, rank, K, generator=gen) / K**0.5).to(dtype).to(DEVICE)
    kept = torch.tensor([True, False, True, True, False])
    slots = torch.full((E,), -1, dtype=torch.int32)
    slots[kept] = torch.arange(int(kept.sum()), dtype=torch.int32)
    slots = slots.to(DEVICE)
    counts = [3, 4, 0, 7, 2]
    M = sum(counts) + 1
    x = torch.randn(M, K, generator=gen).to(dtype).to(DEVICE)
    offsets = torch.tensor(counts, device=DEVICE).cumsum(0)
    zeroed = kept.to(DEVICE)[:, None, None]
    R = launch.launch_experts_projection(x, offsets, B[kept.to(DEVICE)], slots=slots)
    R_full = launch.launch_experts_projection(x, offsets, B * zeroed)
    torch.testing.assert_close(R, R_full, rtol=0, atol=0)
    y = launch.launch_w4a16_experts(x, offsets, q, s, z, b, A[kept.to(DEVICE)], R, slots=slots)
    y_full = launch.launch_w4a16_experts(x, offsets, q, s, z, b, A * zeroed, R_full)
    torch.testing.assert_close(y, y_full, rtol=0, atol=0)
    R_ref = ops.experts_projection(x, offsets, B[kept.to(DEVICE)], slots)
    ref = ops.reference_experts(x, offsets, q, s, z, b, A[kept.to(DEVICE)], R_ref, slots)
    for got, want in ((R_ref, R), (ref, y)):  # different summation orders: a few roundings of the largest value
        atol = 4 * torch.finfo(dtype).eps * float(want.abs().max())
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)
    with pytest.raises(ValueError, match="slots"):
        ops.w4a16_experts(x, offsets, q, s, z, b, None, None, slots)
    with pytest.raises(ValueError, match="slots"):
        ops.w4a16_experts(x, offsets, q, s, z, b, A[:2], R, torch.tensor([0, 1, 2, -1, -1], device=DEVICE))
