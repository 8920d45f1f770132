"""The W4A16 + low-rank epilogue Triton kernels against a float64 reference.

On a CPU machine they run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest); on
a GPU machine, as compiled kernels. Fresh random inputs on every run; outputs are filled with
NaN before the launch, so an element the kernel does not write fails the test.

Tolerance, per element: the kernels accumulate in float32, round the dequantized weight to the
activation dtype on the tensor-core path (as the eager module does), and round the output once.
So ``|y - ref| <= 2 u |ref| + 8 u sqrt(sum_k t_k^2)`` with ``u`` the unit roundoff of the dtype
and ``t_k`` the terms of the dot product (``x_k w_k``, ``R_j A_j``): one unit in the last place
for the output (the interpreter truncates bfloat16 instead of rounding) plus a wide margin on the
random-walk sum of the per-term weight roundings. A wrong nibble, scale row, member or rank
index moves an element by about ``sqrt(sum t^2)`` itself, far outside.
"""
import pytest
import torch

from glowq_fx.kernels import launch
from glowq_fx.kernels.layout import dequantize_packed, group_size_of
from tests_helpers import every_config, only_config, packed_member

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def reference(x, member, R):
    """float64 ``y`` and the per-element scale ``sqrt(sum t^2)`` of its terms."""
    qweight, scales, zeros, bias, A = member
    gs = group_size_of(qweight, scales)
    W = dequantize_packed(qweight, scales, zeros, gs, x.shape[-1], torch.float64)
    x64 = x.double()
    y = x64 @ W.T
    spread = (x64**2) @ (W**2).T
    if bias is not None:
        y = y + bias.double()
    if A is not None:
        y = y + R.double() @ A.double().T
        spread = spread + (R.double() ** 2) @ (A.double() ** 2).T
    return y, spread.sqrt()


def run_and_check(M, K, Ns, group_size, dtype, rank, bias, gen, float_zeros=False, **path):
    """``group_size`` is one for every member, or a list: one per member; zero points stored as
    uint8 16 * zero, or with ``float_zeros`` in the activations' dtype."""
    x = torch.randn(M, K, generator=gen).to(dtype).to(DEVICE)
    sizes = group_size if isinstance(group_size, list) else [group_size] * len(Ns)
    members = [packed_member(N, K, g, dtype, rank, bias, gen, DEVICE, float_zeros) for N, g in zip(Ns, sizes)]
    R = (torch.randn(M, rank, generator=gen)).to(dtype).to(DEVICE) if rank else None
    poisoned = [torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE) for N in Ns]
    outs = launch.launch_w4a16(x, *[list(t) for t in zip(*members)], R, outs=poisoned, **path)
    u = UNIT_ROUNDOFF[dtype]
    for i, (y, member) in enumerate(zip(outs, members)):
        assert y.data_ptr() == poisoned[i].data_ptr() and y.shape == (M, Ns[i])
        ref, spread = reference(x, member, R)
        err = (y.double() - ref).abs()
        tol = 2 * u * ref.abs() + 8 * u * spread
        assert not torch.isnan(y).any(), f"member {i}: elements left unwritten"
        worst = (err / tol).max().item()
        assert worst <= 1, f"member {i} (N={Ns[i]}): error {worst:.2f}x the tolerance"


# M = 1 takes the GEMV, 3 and 17 the small-M GEMM (17: two row blocks), 100 the GEMM, 300 and
# 1030 the dequantize-then-matmul path (M >= DEQUANT_MATMUL_MIN_M);
# N and K are not multiples of any block; K not a multiple of the group size (padded columns).
CASES = [
    # M,  K,   Ns,               group, rank, bias
    (1, 200, [37], 32, 0, False),
    (1, 300, [45, 20, 9, 70, 33], 64, 7, True),  # five members: two launches of <= 4
    (1, 520, [130], 256, 16, True),
    (3, 200, [70, 33, 20], 64, 5, True),
    (17, 264, [40, 50], 128, 16, False),
    (17, 136, [24], 32, 3, True),
    (100, 200, [70, 21], 32, 9, False),
    (300, 100, [130], -1, 0, True),  # per-channel: one group of K_pad = 104
    (1, 100, [50], -1, 3, False),
    (1, 2048, [40], -1, 5, True),  # per-channel, K_pad a power of two longer than any K tile
    # split-K under the interpreter: 256-column K tiles over 4 splits, so 2, 2, 1, 0 tiles per
    # split for K = 1100 and one (the last one partial and padded) per split for K = 1000
    (1, 1100, [40, 24], 64, 8, True),
    (1, 1000, [70], 32, 4, False),
    (1030, 72, [40, 24], 32, 4, True),  # >= DEQUANT_MATMUL_MIN_M: dequantize, then a matmul
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,K,Ns,group_size,rank,bias", CASES)
def test_kernel_matches_float64_reference(M, K, Ns, group_size, rank, bias, dtype, gen):
    run_and_check(M, K, Ns, group_size, dtype, rank, bias, gen)


@pytest.mark.parametrize("M,K,Ns,group_size,rank,bias", [CASES[1], CASES[3], CASES[6], CASES[-1]])
def test_float_zero_points_take_every_path_too(M, K, Ns, group_size, rank, bias, gen):
    """Zero points kept in the model dtype (a GGUF file's float minimum; checkpoints written before
    8-bit zero points) through the GEMV, the small-M GEMM, the GEMM and dequantize + matmul."""
    run_and_check(M, K, Ns, group_size, torch.float16, rank, bias, gen, float_zeros=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,K,Ns,group_size,rank,bias", [c for c in CASES if c[0] == 1])
def test_split_k_gemv_matches_float64_reference(M, K, Ns, group_size, rank, bias, dtype, gen):
    """The split-K GEMV (partials added by the last program of each column block) gives the
    plain GEMV's accuracy, including splits left without a K tile."""
    run_and_check(M, K, Ns, group_size, dtype, rank, bias, gen, split_k=True)


# The several-row GEMV: 3 rows in a 4-row block, 8 in one full block, 11 over two 8-row blocks
# (the second partly masked), 16 (SMALL_M) in two full ones; five members; per-channel scales
ROWS_CASES = [
    (3, 200, [70, 33, 20], 64, 5, True),
    (2, 300, [45, 20, 9, 70, 33], 64, 7, True),
    (8, 264, [40, 50], 128, 16, False),
    (11, 136, [24], 32, 3, True),
    (16, 520, [130], 256, 0, False),
    (5, 100, [50], -1, 3, False),
    (4, 2048, [24], -1, 0, True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,K,Ns,group_size,rank,bias", ROWS_CASES)
def test_rows_gemv_matches_float64_reference(M, K, Ns, group_size, rank, bias, dtype, gen):
    """The GEMV over several rows (each weight tile unpacked once for all of them) keeps the
    one-row GEMV's accuracy on every row, masked rows of a partial block included."""
    run_and_check(M, K, Ns, group_size, dtype, rank, bias, gen, rows_gemv=True)


def test_rows_gemv_is_never_used_beyond_small_m(gen):
    """Above ``SMALL_M`` rows only the GEMMs run, even when asked for the several-row GEMV (its
    register tile grows with the rows; the tensor cores win there)."""
    from glowq_fx.kernels import w4a16 as kernels

    run_and_check(kernels.SMALL_M + 1, 136, [24], 32, torch.float16, 3, True, gen, rows_gemv=True)


def test_tile_group_divides_the_group_and_every_k_tile():
    from glowq_fx.kernels import w4a16 as kernels

    for n_groups in (1, 2, 7):
        for group_size in (8, 24, 32, 40, 96, 104, 128, 256, 512, 4096, 14336):
            tile = kernels.tile_group(group_size, n_groups)
            assert tile & (tile - 1) == 0 and kernels.GEMV_MIN_BLOCK_K % tile == 0
            assert n_groups == 1 or group_size % tile == 0, (group_size, tile)


def test_split_k_gemv_leaves_its_counters_at_zero(gen, monkeypatch):
    """The autotuner times a configuration by launching it again and again on the same buffers:
    each launch must put its arrival counters back to zero, or the next one never writes."""
    fresh = launch.split_k_scratch
    kept = {}

    def same_buffers(x2, Ns):
        kept.setdefault(tuple(Ns), fresh(x2, Ns))
        return kept[tuple(Ns)]

    monkeypatch.setattr(launch, "split_k_scratch", same_buffers)
    for _ in range(3):
        run_and_check(1, 1100, [40, 24], 64, torch.float16, 8, True, gen, split_k=True)
        (arrivals,) = [buffers[1] for buffers in kept.values()]
        assert (arrivals == 0).all()


@pytest.mark.parametrize("M,path", [(1, {"split_k": False}), (1, {"split_k": True}), (3, {"rows_gemv": True}),
                                    (3, {"rows_gemv": False}), (130, {})], ids=["gemv", "split-k", "rows", "small-m",
                                                                               "dequant-matmul"])
def test_strided_weights_are_read_as_their_values(M, path, gen):
    """The ops are public and Inductor may hand them any layout: a transposed ``A``, scales and
    zeros that are column slices of wider tensors, a bias with a stride. The kernels index dense
    row-major memory, so every path must still compute with the tensors' values."""
    dtype, K, N, rank = torch.float16, 264, 40, 6
    x = torch.randn(M, K, generator=gen).to(dtype).to(DEVICE)
    qweight, scales, zeros, bias, A = packed_member(N, K, 32, dtype, rank, True, gen, DEVICE)
    R = torch.randn(M, rank, generator=gen).to(dtype).to(DEVICE)
    wide = lambda t: torch.cat([t, torch.full_like(t, 7.0)], dim=-1)[..., :t.shape[-1]]  # same values, row stride 2N
    strided = (qweight, wide(scales), wide(zeros), torch.stack([bias, -bias], 1)[:, 0], A.t().contiguous().t())
    assert not any(t.is_contiguous() for t in strided[1:])
    (y,) = launch.launch_w4a16(x, *[[t] for t in strided], R, **path)
    ref, spread = reference(x, (qweight, scales, zeros, bias, A), R)
    assert ((y.double() - ref).abs() <= 2 * 2**-11 * ref.abs() + 8 * 2**-11 * spread).all()


def test_mixed_bias_and_correction_in_one_group(gen):
    """Members without a bias or without A take their own launch; each output is still right."""
    dtype, M, K = torch.float16, 3, 128
    x = torch.randn(M, K, generator=gen).to(dtype).to(DEVICE)
    members = [
        packed_member(40, K, 64, dtype, 4, True, gen, DEVICE),
        packed_member(24, K, 64, dtype, 0, False, gen, DEVICE),
    ]
    R = torch.randn(M, 4, generator=gen).to(dtype).to(DEVICE)
    outs = launch.launch_w4a16(x, *[list(t) for t in zip(*members)], R)
    for y, m in zip(outs, members):
        ref, spread = reference(x, m, R if m[4] is not None else None)
        assert ((y.double() - ref).abs() <= 2 * 2**-11 * ref.abs() + 8 * 2**-11 * spread).all()


# On the GPU the autotuner chooses among a list's configurations by speed alone, while the
# interpreter runs only the first of each list: here every configuration runs on its own, on
# shapes that reach its kernel. K = 2048 per-channel (one scale group longer than most K tiles)
# and K = 1100 in groups of 32 (a last K tile that is partial in every configuration).
CONFIG_LISTS = {
    # module attribute: (raw kernel, its configurations, launcher option that reaches it, row counts)
    "gemv_kernel": ("_w4a16_gemv_kernel", "GEMV_CONFIGS", {"split_k": False}, (1,)),
    "gemv_split_k_kernel": ("_w4a16_gemv_kernel", "SPLIT_K_CONFIGS", {"split_k": True}, (1,)),
    "rows_gemv_kernel": ("_w4a16_rows_gemv_kernel", "ROWS_GEMV_CONFIGS", {"rows_gemv": True}, (3, 11)),
    "small_m_kernel": ("_w4a16_gemm_kernel", "SMALL_M_CONFIGS", {"rows_gemv": False}, (3, 17)),
    "gemm_kernel": ("_w4a16_gemm_kernel", "GEMM_CONFIGS", {}, (40,)),
}


def _every_config():
    from glowq_fx.kernels import w4a16 as kernels

    return every_config(kernels, CONFIG_LISTS)


@pytest.mark.parametrize("attr,index", _every_config())
def test_every_autotune_configuration_is_right(attr, index, gen, monkeypatch):
    import triton

    from glowq_fx.kernels import w4a16 as kernels

    raw, configs, path, row_counts = CONFIG_LISTS[attr]
    only_config(monkeypatch, kernels, attr, raw, configs, index, kernels.AUTOTUNE_KEY)
    try:
        for M in row_counts:
            run_and_check(M, 2048, [40], -1, torch.bfloat16, 5, True, gen, **path)
            run_and_check(M, 1100, [40, 24], 32, torch.float16, 8, False, gen, **path)
    except triton.runtime.errors.OutOfResources as exc:  # compiled on a GPU only; its autotuner skips it too
        pytest.skip(f"this configuration does not fit this GPU: {exc}")


@pytest.mark.parametrize("M", [1, 3, 200])
def test_members_of_other_group_sizes_share_one_call(M, gen):
    """The rewrite fuses every member that reads one x; the launcher gives each group size its own
    launch (a kernel specialisation), and every member still gets its own exact output."""
    run_and_check(M, 200, [40, 24, 33, 16], [32, 64, -1, 32], torch.float16, 5, True, gen)


def check_projected(K, Ns, group_size, dtype, rank, bias, gen, own_r=False, sync=None):
    """The one-launch GEMV that makes R = x B^T itself, against float64 with R rounded to the
    activation dtype (as the separate projection's output is): every member, NaN-poisoned
    outputs fully written. With ``sync`` given, that counter buffer is used (and must come back zero)."""
    x = torch.randn(1, K, generator=gen).to(dtype).to(DEVICE)
    members = [packed_member(N, K, group_size, dtype, rank, bias, gen, DEVICE) for N in Ns]
    B = (torch.randn(rank, K, generator=gen) / K**0.5).to(dtype).to(DEVICE)
    poisoned = [torch.full((1, N), float("nan"), dtype=dtype, device=DEVICE) for N in Ns]
    args = [list(t) for t in zip(*members)]
    if sync is None:
        outs = launch.launch_w4a16_projected(x, *args, B, outs=poisoned, one_launch=True, own_r=own_r)
    else:
        launch.gemv_projected(x, *args, B, poisoned, sync, own_r)
        outs = poisoned
    R = (x.double() @ B.double().T).to(dtype)
    u = UNIT_ROUNDOFF[dtype]
    for i, (y, member) in enumerate(zip(outs, members)):
        assert y.data_ptr() == poisoned[i].data_ptr() and not torch.isnan(y).any(), f"member {i}: unwritten"
        ref, spread = reference(x, member, R)
        worst = ((y.double() - ref).abs() / (2 * u * ref.abs() + 8 * u * spread)).max().item()
        assert worst <= 1, f"member {i} (N={Ns[i]}): error {worst:.2f}x the tolerance"


PROJECTED_CASES = [
    # K,   Ns,           group, rank, bias
    (300, [45, 20], 64, 7, True),
    (520, [130], 256, 16, False),
    (1100, [40, 24, 33, 16], 32, 70, True),  # four members; rank 70: 18 producers, partial R tiles
    (100, [50], -1, 3, False),  # per-channel
]


@pytest.mark.parametrize("own_r", [False, True], ids=["producers", "own-r"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,Ns,group,rank,bias", PROJECTED_CASES)
def test_one_launch_projected_gemv_matches_float64(K, Ns, group, rank, bias, dtype, own_r, gen):
    check_projected(K, Ns, group, dtype, rank, bias, gen, own_r=own_r)


def test_one_launch_leaves_its_counters_zero_for_the_next_launch(gen):
    """The autotuner reruns a launch on the same buffers: the last program of each launch puts the
    ticket, done and finished counters back to zero, so a second launch on them is right too."""
    sync = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    for _ in range(2):
        check_projected(300, [45, 20], 64, torch.float16, 7, True, gen, sync=sync)
        assert (sync == 0).all()


def test_one_launch_is_refused_where_it_does_not_apply(gen):
    members = [packed_member(N, 64, 32, torch.float16, 4, False, gen, DEVICE) for N in (16, 16)]
    q, s, z, b, A = ([m[i] for m in members] for i in range(5))
    B = torch.randn(4, 64, generator=gen).half().to(DEVICE)
    x = torch.randn(2, 64, generator=gen).half().to(DEVICE)
    with pytest.raises(ValueError, match="one row"):
        launch.launch_w4a16_projected(x, q, s, z, b, A, B, one_launch=True)
    # two rows: R's own launch, then the group's, whatever was asked for by default
    ys = launch.launch_w4a16_projected(x, q, s, z, b, A, B)
    want = launch.launch_w4a16(x, q, s, z, b, A, launch.launch_projection(x, B))
    assert all(torch.equal(y, w) for y, w in zip(ys, want))


def _every_projected_config():
    from glowq_fx.kernels import w4a16 as kernels

    return every_config(kernels, {"gemv_projected_kernel": ("_w4a16_gemv_projected_kernel", "PROJECTED_CONFIGS")})


@pytest.mark.parametrize("attr,index", _every_projected_config())
def test_every_projected_configuration_is_right(attr, index, gen, monkeypatch):
    import triton

    from glowq_fx.kernels import w4a16 as kernels

    only_config(monkeypatch, kernels, attr, "_w4a16_gemv_projected_kernel", "PROJECTED_CONFIGS", index,
                kernels.AUTOTUNE_KEY)
    try:
        check_projected(2200, [40, 24], 32, torch.float16, 9, True, gen)  # partial last K tile everywhere
        check_projected(2048, [40], -1, torch.bfloat16, 5, False, gen, own_r=True)  # per-channel
    except triton.runtime.errors.OutOfResources as exc:  # compiled on a GPU only; its autotuner skips it too
        pytest.skip(f"this configuration does not fit this GPU: {exc}")
