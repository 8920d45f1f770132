"""Our CPU GEMV (glowq_fx/kernels/cpu/gemv.cpp): layout, arithmetic against float64, the op, the choice."""
import pytest
import torch
import torch.nn.functional as F

from glowq_fx import ops
from glowq_fx.kernels import cpu_gemv, cpu_int4
from glowq_fx.kernels.layout import (
    dequantize_packed,
    pack,
    padded_in_features,
    unpack,
    whole_group_columns,
    zero_points,
)
from glowq_fx.modules.kernels import use_cpu_kernels
from glowq_fx.modules.linear import QuantizedLinear, SharedProjection
from glowq_fx.quant.rtn import quantize_rtn

pytestmark = pytest.mark.skipif(cpu_gemv.unavailable_reason() is not None,
                                reason=f"glowq's CPU GEMV is not available here: {cpu_gemv.unavailable_reason()}")


def _packed(N, K, gs, gen, dtype=torch.float32):
    return pack(quantize_rtn(torch.randn(N, K, generator=gen).to(dtype), gs))


def _rounded_activations(x, K_pad):
    """The kernel's int16 activations, dequantized (float64): one scale max|x| / 32767 per 32
    columns, codes round(x 32767 / max|x|) computed in float32 as the kernel does."""
    M, K = x.shape
    blocks = F.pad(x.float(), (0, K_pad - K)).view(M, -1, cpu_gemv.BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    codes = torch.round(blocks * torch.where(amax > 0, 32767.0 / amax, torch.zeros_like(amax)))
    assert codes.abs().max() <= 32767
    return (codes.double() * (amax / 32767.0).double()).view(M, K_pad)


def test_layout_holds_every_code_in_order(gen):
    """Byte j of a 32-code block holds code j (low nibble) and code j + 16 (high nibble); the
    kernel's rows are whole groups (the packed weight's partial last group filled with zero codes)."""
    p = _packed(40, 300, 64, gen)
    assert padded_in_features(p.qweight) == 304  # stored: whole words, a partial last group
    weight, params = cpu_gemv.convert(p.qweight, p.scales, p.zeros)
    K_pad = p.scales.shape[0] * 64
    assert weight.dtype == torch.uint8 and tuple(weight.shape) == (40, K_pad // 2)
    blocks = weight.view(40, K_pad // 32, 16).long()
    codes = torch.cat([blocks & 15, blocks >> 4], -1).view(40, K_pad)
    assert torch.equal(codes[:, :300], unpack(p).codes[:, :300].long()) and not codes[:, 304:].any()
    assert p.zeros.dtype == torch.uint8  # RTN's integer zero points, stored as 16 * zero
    assert torch.equal(params[0], p.scales.float().T)
    assert torch.equal(params[1], (p.scales.float() * zero_points(p.zeros)).T)


@pytest.mark.parametrize("rows", [1, 3, cpu_gemv.MAX_ROWS])
@pytest.mark.parametrize("N,K,gs", [(64, 512, 32), (40, 300, 64), (100, 256, 128), (48, 700, 256), (24, 96, 32)])
def test_gemv_is_the_product_with_its_rounded_activations(rows, N, K, gs, gen):
    """The kernel computes deq(W) x_r up to float32 accumulation, x_r the int16-rounded
    activations (2e-5: float32 sums of s q x and s z x, each several times the result they differ
    by, measured 2-6e-6); x_r is within 1e-4 of x (relative, over the output); bfloat16
    activations give the float32 result of their values, rounded once to bfloat16."""
    p = _packed(N, K, gs, gen)
    weight, params = cpu_gemv.convert(p.qweight, p.scales, p.zeros)
    x = (torch.randn(rows, K, generator=gen) * torch.rand(1, K, generator=gen) * 4).bfloat16().float()
    y = cpu_gemv.matmul(x, weight, params, gs)
    assert y.dtype == torch.float32 and tuple(y.shape) == (rows, N)
    W = dequantize_packed(p.qweight, p.scales, p.zeros, gs, K, torch.float64)  # (N, K)
    exact = _rounded_activations(x, whole_group_columns(p.qweight, p.scales.shape[0]))[:, :K] @ W.T
    assert (y.double() - exact).norm() <= 2e-5 * exact.norm()
    unrounded = x.double() @ W.T
    assert (y.double() - unrounded).norm() <= 1e-4 * unrounded.norm()
    assert torch.equal(cpu_gemv.matmul(x.bfloat16(), weight, params, gs), y.bfloat16())


@pytest.mark.parametrize("rows", [1, 4, cpu_gemv.MAX_ROWS])
@pytest.mark.parametrize("N,K", [(200, 96), (64, 100), (33, 576)])
def test_int8_gemv_is_the_product_with_its_rounded_activations(rows, N, K, gen):
    """int8 codes, one scale per row: deq(W) x_r up to float32 accumulation, K not a multiple of
    32 included (the last block's tail)."""
    from glowq_fx.quant.rtn import quantize_int8_rows

    qweight, scales = quantize_int8_rows(torch.randn(N, K, generator=gen))
    x = torch.randn(rows, K, generator=gen) * torch.rand(1, K, generator=gen) * 4
    y = cpu_gemv.int8_matmul(x, qweight, scales.float())
    W = qweight.double() * scales.double().unsqueeze(1)
    exact = _rounded_activations(x, -(-K // cpu_gemv.BLOCK) * cpu_gemv.BLOCK)[:, :K] @ W.T
    assert (y.double() - exact).norm() <= 1e-5 * exact.norm()  # float32 sums over K / 32 blocks
    assert torch.equal(cpu_gemv.int8_matmul(x.bfloat16(), qweight, scales.float()),
                       cpu_gemv.int8_matmul(x.bfloat16().float(), qweight, scales.float()).bfloat16())
    with pytest.raises(RuntimeError, match="w must be int8"):
        torch.ops.glowq_cpu.w8a16_gemv(x[:, :-1], qweight, scales.float())


def test_gemv_zero_rows_and_zero_activations(gen):
    p = _packed(32, 128, 32, gen)
    weight, params = cpu_gemv.convert(p.qweight, p.scales, p.zeros)
    assert cpu_gemv.matmul(torch.randn(0, 128), weight, params, 32).shape == (0, 32)
    assert torch.equal(cpu_gemv.matmul(torch.zeros(2, 128), weight, params, 32), torch.zeros(2, 32))


def test_gemv_refuses_what_it_cannot_take(gen):
    p = _packed(32, 128, 32, gen)
    weight, params = cpu_gemv.convert(p.qweight, p.scales, p.zeros)
    gemv = torch.ops.glowq_cpu.w4a16_gemv
    with pytest.raises(RuntimeError, match="M <= 16 rows"):
        gemv(torch.randn(cpu_gemv.MAX_ROWS + 1, 128), weight, params[0], params[1], 32)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        gemv(torch.randn(1, 128).half(), weight, params[0], params[1], 32)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        gemv(torch.randn(1, 128), weight, params[0], params[1], 48)
    with pytest.raises(RuntimeError, match="columns"):
        gemv(torch.randn(1, 64), weight, params[0], params[1], 32)
    with pytest.raises(RuntimeError, match="scaled zeros must be float32"):
        gemv(torch.randn(1, 128), weight, params[0].double(), params[1], 32)
    per_channel = _packed(32, 200, -1, gen)  # one group of 200 columns
    with pytest.raises(ValueError, match="multiples of 32"):
        cpu_gemv.convert(per_channel.qweight, per_channel.scales, per_channel.zeros)
    assert "group size 200" in cpu_int4.unsupported_reason(32, 200, "glowq")


@pytest.mark.parametrize("rows", [1, 5])
def test_op_runs_the_gemv_with_bias_and_correction(rows, gen):
    """``w4a16_linear_int4pack`` on our layout: the reference's formula, up to the activations' rounding."""
    N, K, gs, rank = 48, 200, 64, 8
    p = _packed(N, K, gs, gen)
    b, A = torch.randn(N, generator=gen), torch.randn(N, rank, generator=gen)
    x, R = torch.randn(2, rows, K, generator=gen), torch.randn(2, rows, rank, generator=gen)
    weight, params = cpu_int4.convert(p.qweight, p.scales, p.zeros, "glowq")
    y = ops.w4a16_linear_int4pack(x, p.qweight, p.scales, p.zeros, b, A, R, weight, params)
    ref = ops.reference_linear(x.double(), p.qweight, p.scales.double(), zero_points(p.zeros).double(), b.double(),
                               A.double(), R.double())
    assert (y.double() - ref).norm() <= 1e-4 * ref.norm()


def test_op_past_the_gemv_rows_runs_the_reference(gen):
    p = _packed(48, 128, 32, gen)
    weight, params = cpu_int4.convert(p.qweight, p.scales, p.zeros, "glowq")
    x = torch.randn(cpu_gemv.MAX_ROWS + 1, 128, generator=gen)
    y = ops.w4a16_linear_int4pack(x, p.qweight, p.scales, p.zeros, None, None, None, weight, params)
    assert torch.equal(y, ops.reference_linear(x, p.qweight, p.scales, p.zeros, None, None, None))


def _linear(gen, N=40, K=192, gs=64, rank=8):
    proj = SharedProjection(torch.randn(rank, K, generator=gen), ("m",))
    return QuantizedLinear(_packed(N, K, gs, gen), torch.randn(N, generator=gen), torch.randn(N, rank, generator=gen),
                           proj)


def test_auto_chooses_the_gemv_and_falls_back_to_pytorchs_kernel(gen, monkeypatch):
    """N = 40 (not a multiple of 16) runs the GEMV; without it, PyTorch's kernel cannot take it."""
    model = torch.nn.ModuleDict({"a": _linear(gen), "b": _linear(gen, N=64)})
    assert use_cpu_kernels(model) == {"a": "cpu_gemv", "b": "cpu_gemv"}
    x = torch.randn(1, 192, generator=gen)
    reference = ops.reference_linear(x, model["a"].qweight, model["a"].scales, model["a"].zeros, model["a"].bias,
                                     model["a"].A, model["a"].projection(x))
    assert (model["a"](x) - reference).norm() <= 1e-4 * reference.norm()
    model.to(torch.bfloat16)  # converted again for the same kernel
    assert model["a"].kernel_name == "cpu_gemv" and "kernel=cpu_gemv" in repr(model["a"])
    monkeypatch.setattr(cpu_gemv, "unavailable_reason", lambda: "no C++ compiler (g++ or $CXX) to build it with")
    model.to(torch.float32)
    assert model["a"].kernel_name == "reference" and model["b"].kernel_name == "cpu_int4"
    with pytest.raises(RuntimeError, match="not available here: no C\\+\\+ compiler"):
        use_cpu_kernels(model, kernel="glowq")


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path):
    target = tmp_path / "lib.so"
    with pytest.raises(RuntimeError):
        cpu_gemv._build("false", target)
    assert list(tmp_path.iterdir()) == []


def test_the_library_is_cached_per_source_torch_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("GLOWQ_CACHE", str(tmp_path))
    path = cpu_gemv.library_path("g++")
    assert path.parent.parent == tmp_path / "cpu_kernels"
    assert cpu_gemv.library_path("clang++") != path


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_call_equals_each_members_own_call(rows, dtype, gen):
    """One call for a group (activations rounded once per group size, R made from B inside) gives
    each member exactly its own call's result, R from ``project``."""
    K, rank = 192, 8
    members = [(_packed(N, K, gs, gen, dtype), b, a) for N, gs, b, a in
               [(64, 32, True, True), (40, 64, False, True), (24, 32, False, False)]]
    converted = [cpu_gemv.convert(p.qweight, p.scales, p.zeros) for p, _, _ in members]
    biases = [torch.randn(p.out_features, generator=gen).to(dtype) if b else None for p, b, _ in members]
    As = [torch.randn(p.out_features, rank, generator=gen).to(dtype) if a else None for p, _, a in members]
    x = torch.randn(2, rows, K, generator=gen).to(dtype)
    B = torch.randn(rank, K, generator=gen).to(dtype)
    R = cpu_gemv.project(x, B)
    gs = [p.group_size for p, _, _ in members]
    made = cpu_gemv.group_matmul(x, [w for w, _ in converted], [c for _, c in converted], gs, biases, As, B=B)
    given = cpu_gemv.group_matmul(x, [w for w, _ in converted], [c for _, c in converted], gs, biases, As, R=R)
    for i, ((w, c), b, A) in enumerate(zip(converted, biases, As)):
        own = cpu_gemv.matmul(x, w, c, gs[i], b, A, R if A is not None else None)
        assert torch.equal(made[i], own) and torch.equal(given[i], own)
    with pytest.raises(RuntimeError, match="R or B"):
        cpu_gemv.group_matmul(x, [converted[0][0]], [converted[0][1]], gs[:1], biases[:1], As[:1], R=R, B=B)
