"""The glowq:: ops refuse wrong inputs with a message naming the problem (never a silently
uncorrected output), and their CPU path is the eager arithmetic."""
import pytest
import torch

from glowq_fx import ops
from glowq_fx.kernels import launch
from glowq_fx.kernels.layout import pack
from glowq_fx.quant.rtn import quantize_rtn


@pytest.fixture
def member(gen):
    W = torch.randn(24, 64, generator=gen)
    p = pack(quantize_rtn(W, 32))
    A = torch.randn(24, 4, generator=gen)
    return p, A


def test_cpu_path_is_dequantize_then_linear(member, gen):
    p, A = member
    x = torch.randn(3, 64, generator=gen)
    B = torch.randn(4, 64, generator=gen)
    R = ops.shared_projection(x, B)
    y = ops.w4a16_linear(x, p.qweight, p.scales, p.zeros, None, A, R)
    W = ops.reference_linear(torch.eye(64), p.qweight, p.scales, p.zeros, None, None, None).T
    assert torch.allclose(y, x @ W.T + (x @ B.T) @ A.T, atol=1e-5)
    ys = ops.w4a16_group(x, [p.qweight, p.qweight], [p.scales] * 2, [p.zeros] * 2, [None] * 2, [A, A], R)
    assert all(torch.equal(t, y) for t in ys)
    # the group that makes its own R: the projection's arithmetic, then the group's
    made = ops.w4a16_group_projected(x, [p.qweight, p.qweight], [p.scales] * 2, [p.zeros] * 2, [None] * 2, [A, A], B)
    assert all(torch.equal(t, y) for t in made)


def test_bad_inputs_are_named(member, gen):
    p, A = member
    x = torch.randn(3, 64, generator=gen)
    R = torch.randn(3, 4, generator=gen)
    with pytest.raises(ValueError, match="A and R go together"):
        ops.w4a16_linear(x, p.qweight, p.scales, p.zeros, None, A, None)
    with pytest.raises(ValueError, match="R must be"):
        ops.w4a16_linear(x, p.qweight, p.scales, p.zeros, None, A, R[:2])
    with pytest.raises(ValueError, match="A must be"):
        ops.w4a16_linear(x, p.qweight, p.scales, p.zeros, None, A[:, :3], R)
    with pytest.raises(ValueError, match="does not belong to this weight"):
        ops.w4a16_linear(torch.randn(3, 96), p.qweight, p.scales, p.zeros, None, None, None)
    with pytest.raises(ValueError, match="run the model in the dtype"):
        ops.w4a16_linear(x.double(), p.qweight, p.scales, p.zeros, None, None, None)
    with pytest.raises(ValueError, match="B must be"):
        ops.shared_projection(x, torch.randn(4, 65))
    with pytest.raises(ValueError, match="one qweight/scales/zeros/bias/A per member"):
        ops.w4a16_group(x, [p.qweight], [], [p.zeros], [None], [None], None)
    with pytest.raises(ValueError, match="qweight is on cpu but x is on meta"):
        ops.w4a16_linear(x.to("meta"), p.qweight, p.scales, p.zeros, None, None, None)
    with pytest.raises(ValueError, match="member 1: A is on meta but x is on cpu"):
        ops.w4a16_group(x, [p.qweight] * 2, [p.scales] * 2, [p.zeros] * 2, [None] * 2, [A, A.to("meta")], R)
    with pytest.raises(ValueError, match="B is on meta but x is on cpu"):
        ops.shared_projection(x, torch.randn(4, 64, device="meta"))
    B = torch.randn(4, 64, generator=gen)
    with pytest.raises(ValueError, match="member 0: A must be"):  # A's rank is not B's
        ops.w4a16_group_projected(x, [p.qweight], [p.scales], [p.zeros], [None], [A[:, :3]], B)
    with pytest.raises(ValueError, match="one qweight/scales/zeros/bias/A per member"):
        ops.w4a16_group_projected(x, [p.qweight] * 2, [p.scales] * 2, [p.zeros] * 2, [None] * 2, [A], B)
    with pytest.raises(ValueError, match="B must be"):
        ops.w4a16_group_projected(x, [p.qweight], [p.scales], [p.zeros], [None], [A], B[:, :60])


@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "kernels"])
def test_no_rows_give_empty_outputs(member, kernel, monkeypatch):
    """Zero tokens (an empty batch) give empty outputs on every path, no launch."""
    p, A = member
    x, R = torch.randn(2, 0, 64, dtype=torch.float16), torch.randn(2, 0, 4, dtype=torch.float16)
    scales, zeros, A = p.scales.half(), p.zeros.half(), A.half()
    monkeypatch.setattr(ops, "_uses_kernels", lambda x: kernel)
    monkeypatch.setattr(launch, "wrap_triton", lambda kernel: pytest.fail("a kernel was launched for zero rows"))
    monkeypatch.setattr(torch, "mm", lambda *a, **k: pytest.fail("cuBLAS was called for zero rows"))
    assert ops.shared_projection(x, torch.randn(4, 64, dtype=torch.float16)).shape == (2, 0, 4)
    assert ops.w4a16_linear(x, p.qweight, scales, zeros, None, A, R).shape == (2, 0, 24)
    ys = ops.w4a16_group(x, [p.qweight] * 2, [scales] * 2, [zeros] * 2, [None] * 2, [A, A], R)
    assert [tuple(y.shape) for y in ys] == [(2, 0, 24)] * 2
    ys = ops.w4a16_group_projected(x, [p.qweight] * 2, [scales] * 2, [zeros] * 2, [None] * 2, [A, A],
                                   torch.randn(4, 64, dtype=torch.float16))
    assert [tuple(y.shape) for y in ys] == [(2, 0, 24)] * 2


def _experts(E=4, N=24, K=64, r=3, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed = [pack(quantize_rtn(torch.randn(N, K, generator=g), 32)) for _ in range(E)]
    q, s, z = (torch.stack([getattr(p, f) for p in packed]) for f in ("qweight", "scales", "zeros"))
    b = torch.randn(E, N, generator=g) if bias else None
    return q, s, z, b, torch.randn(E, N, r, generator=g), torch.randn(E, r, K, generator=g) / 8


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 7], [1, 1, 1, 1]])
def test_experts_ops_are_each_experts_rows_through_its_weight(counts):
    from glowq_fx.kernels.layout import dequantize_packed, group_size_of

    q, s, z, b, A, B = _experts()
    M = sum(counts) + 2  # two rows past the last expert (tokens no expert here serves)
    x = torch.randn(M, 64, generator=torch.Generator().manual_seed(sum(counts)))
    offsets = torch.tensor(counts).cumsum(0)
    R = ops.experts_projection(x, offsets, B)
    y = ops.w4a16_experts(x, offsets, q, s, z, b, A, R)
    lo = 0
    for e, n in enumerate(counts):
        rows = x[lo:lo + n].double()
        W = dequantize_packed(q[e], s[e], z[e], group_size_of(q[e], s[e]), 64, torch.float64)
        expected = rows @ W.T + b[e].double() + (rows @ B[e].double().T) @ A[e].double().T
        torch.testing.assert_close(R[lo:lo + n].double(), rows @ B[e].double().T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[lo:lo + n].double(), expected, rtol=1e-5, atol=1e-5)
        lo += n
    assert (y[lo:] == 0).all() and (R[lo:] == 0).all()


def test_experts_ops_name_bad_inputs_and_trace_with_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, s, z, b, A, B = _experts()
    x, offsets = torch.randn(6, 64), torch.tensor([2, 2, 5, 6])
    with pytest.raises(ValueError, match=r"offsets must be \(4,\) integers"):
        ops.w4a16_experts(x, offsets[:3], q, s, z, b, None, None)
    with pytest.raises(ValueError, match="not nondecreasing row ends"):
        ops.w4a16_experts(x, torch.tensor([2, 1, 5, 6]), q, s, z, b, None, None)
    with pytest.raises(ValueError, match="A and R go together"):
        ops.w4a16_experts(x, offsets, q, s, z, b, A, None)
    with pytest.raises(ValueError, match=r"experts' bias must have one entry per expert \(4\)"):
        ops.w4a16_experts(x, offsets, q, s, z, b[:3], None, None)
    with pytest.raises(ValueError, match=r"B must be \(E=4, rank, K\)"):
        ops.experts_projection(x, offsets, B[:2])
    with FakeTensorMode() as mode:
        fx_, fo = mode.from_tensor(x), mode.from_tensor(offsets)
        fq, fs, fz, fA, fB = (mode.from_tensor(t) for t in (q, s, z, A, B))
        R = torch.ops.glowq.experts_projection(fx_, fo, fB)
        y = torch.ops.glowq.w4a16_experts(fx_, fo, fq, fs, fz, None, fA, R)
        assert tuple(R.shape) == (6, 3) and tuple(y.shape) == (6, 24)
