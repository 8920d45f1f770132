"""PyTorch's CPU int4 kernel on our packed codes (``kernel="aten"``; our GEMV is tests/kernels/test_cpu_gemv.py):
the layout conversion, the op, the module."""
import logging

import pytest
import torch

from glowq_fx import ops
from glowq_fx.kernels import cpu_int4
from glowq_fx.kernels.layout import dequantize_packed, pack, unpack, whole_group_columns
from glowq_fx.modules.kernels import use_cpu_kernels
from glowq_fx.modules.linear import QuantizedLinear, SharedProjection
from glowq_fx.quant.rtn import quantize_rtn

pytestmark = pytest.mark.skipif(cpu_int4.unsupported_reason(64, 64, "aten") is not None,
                                reason=f"no CPU int4 kernel here: {cpu_int4.unsupported_reason(64, 64, 'aten')}")


def _packed(N, K, gs, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return pack(quantize_rtn(torch.randn(N, K, generator=g).to(dtype), gs))


def _kernel_weight(p):
    """The kernel's dequantized weight (K_pad, N): the identity through the kernel (one nonzero
    product per output, so the only rounding is the kernel's own)."""
    weight, sz = cpu_int4.convert(p.qweight, p.scales, p.zeros, "aten")
    K_pad = whole_group_columns(p.qweight, p.scales.shape[0])  # the kernel's whole groups
    return torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(K_pad, dtype=torch.bfloat16), weight, p.group_size, sz)


@pytest.mark.parametrize("gs", cpu_int4.GROUP_SIZES)
@pytest.mark.parametrize("N,K", [(64, 512), (48, 300), (144, 256)])
def test_conversion_is_exact(gs, N, K):
    """Every code lands where the kernel reads it: the kernel's weight is exactly
    ``bf16((q - 8) * scale + zero)`` of our codes and the converted scales and zeros."""
    p = _packed(N, K, gs, seed=N + K + gs)
    codes = unpack(p).codes.float()  # (N, K_pad)
    sz = cpu_int4.scales_and_zeros(p.scales, p.zeros).double()  # (G, N, 2)
    s, z = (sz[..., i].repeat_interleave(p.group_size, 0).T for i in (0, 1))  # (N, K_pad)
    expected = ((codes.double() - 8) * s + z).to(torch.bfloat16).T
    assert torch.equal(_kernel_weight(p)[:K], expected[:K])  # past K: a partial last group's filler codes


@pytest.mark.parametrize("gs", cpu_int4.GROUP_SIZES)
def test_zero_form_matches_our_dequantization(gs):
    """``scale, zero = s, (8 - z) s`` dequantizes our ``(q - z) s`` up to the bf16 rounding of the
    scale and the zero (at most a few units of bf16 in the last place of the group's range)."""
    p = _packed(96, 512, gs, seed=gs)
    ours = dequantize_packed(p.qweight, p.scales, p.zeros, p.group_size, 512, torch.float32).T
    theirs = _kernel_weight(p).float()[:512]
    bound = 2.0 ** -6 * p.scales.abs().max() * 16  # bf16 ulp (2^-8) of values up to 15 s, twice over
    assert (theirs - ours).abs().max() <= bound


def test_reasons_for_shapes_the_kernel_cannot_take(monkeypatch):
    assert cpu_int4.unsupported_reason(40, 64, "aten") == "out_features 40 is not a multiple of 16"
    assert "group size 16" in cpu_int4.unsupported_reason(64, 16, "aten")
    assert "group size 512" in cpu_int4.unsupported_reason(64, 512, "aten")
    monkeypatch.setattr(cpu_int4, "capability", lambda: "DEFAULT")
    assert "AVX2" in cpu_int4.unsupported_reason(64, 64, "aten")
    with pytest.raises(ValueError, match="CPU kernel must be one of"):
        cpu_int4.unsupported_reason(64, 64, "fast")


def _member(N, K, gs, rank, bias, seed):
    g = torch.Generator().manual_seed(seed)
    p = _packed(N, K, gs, seed)
    b = torch.randn(N, generator=g) if bias else None
    A = torch.randn(N, rank, generator=g) if rank else None
    R = lambda x: torch.randn(*x.shape[:-1], rank, generator=g) if rank else None  # noqa: E731
    return p, b, A, R


@pytest.mark.parametrize("rows", [1, 3, cpu_int4.MAX_ROWS])
@pytest.mark.parametrize("rank,bias", [(0, False), (8, True)])
def test_op_decode_rows_run_the_kernel(rows, rank, bias):
    """Decode rows: the op is the kernel's product (on bf16 activations) plus bias and ``R A^T``
    in float32, checked against float64 arithmetic on the kernel's own weight."""
    p, b, A, R_of = _member(64, 200, 64, rank, bias, seed=rows)
    x = torch.randn(2, rows, 200)
    R = R_of(x)
    weight, sz = cpu_int4.convert(p.qweight, p.scales, p.zeros, "aten")
    y = ops.w4a16_linear_int4pack(x, p.qweight, p.scales, p.zeros, b, A, R, weight, sz)
    W = _kernel_weight(p).double()[:200]  # (K, N)
    expected = x.to(torch.bfloat16).double() @ W
    scale = expected.abs().max()  # of the int4 product alone, as strict as before
    if b is not None:
        expected = expected + b.double()
    if A is not None:
        expected = expected + R.double() @ A.double().T
    assert (y.double() - expected).abs().max() <= 1e-2 * scale


def test_op_prefill_rows_run_the_reference():
    """Past MAX_ROWS the op dequantizes and multiplies in x's dtype: the reference, bit for bit."""
    p, b, A, R_of = _member(64, 256, 32, 4, True, seed=7)
    x = torch.randn(cpu_int4.MAX_ROWS + 1, 256)
    R = R_of(x)
    weight, sz = cpu_int4.convert(p.qweight, p.scales, p.zeros, "aten")
    y = ops.w4a16_linear_int4pack(x, p.qweight, p.scales, p.zeros, b, A, R, weight, sz)
    assert torch.equal(y, ops.reference_linear(x, p.qweight, p.scales, p.zeros, b, A, R))


def test_op_checks_the_converted_weight():
    p, *_ = _member(64, 256, 32, 0, False, seed=1)
    weight, sz = cpu_int4.convert(p.qweight, p.scales, p.zeros, "aten")
    x = torch.randn(1, 256)
    with pytest.raises(ValueError, match="int4pack must be uint8"):
        ops.w4a16_linear_int4pack(x, p.qweight, p.scales, p.zeros, None, None, None, weight[:32], sz)
    with pytest.raises(ValueError, match="scales_zeros must be"):
        ops.w4a16_linear_int4pack(x, p.qweight, p.scales, p.zeros, None, None, None, weight, sz.float())


def _linear(N=64, K=192, gs=64, rank=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(N + K)
    proj = SharedProjection(torch.randn(rank, K, generator=g).to(dtype), ("m",))
    return QuantizedLinear(_packed(N, K, gs, 3, dtype), torch.randn(N, generator=g).to(dtype),
                           torch.randn(N, rank, generator=g).to(dtype), proj)


def test_module_converts_keeps_its_state_and_follows_casts():
    lin = _linear()
    x = torch.randn(1, 192)
    reference = lin(x)
    keys = set(lin.state_dict())
    assert lin.use_cpu_int4_kernel(kernel="aten") is None and lin.kernel_name == "cpu_int4"
    assert set(lin.state_dict()) == keys  # the machine's layout never reaches a checkpoint
    y = lin(x)
    assert (y - reference).abs().max() <= 1e-2 * reference.abs().max()
    lin.to(torch.bfloat16)  # made again, for the same kernel, from the cast scales and zeros
    assert lin.kernel_name == "cpu_int4"
    assert torch.equal(lin.scales_zeros, cpu_int4.scales_and_zeros(lin.scales, lin.zeros))
    lin.to("meta")
    assert lin.int4pack is None and "meta" in lin.cpu_int4_unsupported()


def test_loading_new_codes_converts_them_again():
    lin, other = _linear(), _linear(K=192, gs=64)
    other.load_state_dict({k: torch.zeros_like(v) if k == "qweight" else v for k, v in other.state_dict().items()})
    lin.use_cpu_int4_kernel(kernel="aten")
    lin.load_state_dict(other.state_dict())
    assert torch.equal(lin.int4pack, cpu_int4.convert(other.qweight, other.scales, other.zeros, "aten")[0])


def test_use_cpu_kernels_says_why_once_per_reason(caplog):
    model = torch.nn.ModuleDict({"a": _linear(N=40), "b": _linear(N=40), "c": _linear(N=64)})
    with caplog.at_level(logging.WARNING, logger="glowq_fx"):
        kernels = use_cpu_kernels(model, kernel="aten")
    assert kernels == {"a": "reference: out_features 40 is not a multiple of 16",
                       "b": "reference: out_features 40 is not a multiple of 16", "c": "cpu_int4"}
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "2 quantized linear(s)" in said[0] and "(a, b)" in said[0]
    x = torch.randn(1, 192)
    assert torch.equal(model["a"](x), ops.reference_linear(x, model["a"].qweight, model["a"].scales, model["a"].zeros,
                                                           model["a"].bias, model["a"].A, model["a"].projection(x)))
    assert use_cpu_kernels(model, enable=False)["c"] == "reference: disabled" and model["c"].int4pack is None
