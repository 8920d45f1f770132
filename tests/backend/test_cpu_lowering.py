"""glowq_backend on the CPU: Inductor's generated code calls the 4-bit kernels itself (our GEMV, or
PyTorch's int4 kernel that Inductor lowers), with the projections and epilogues in its own loops."""
import copy
import functools
import re

import pytest
import torch
import transformers as T

from glowq_fx import GlowQConfig, quantize_
from glowq_fx.backend import glowq_backend
from glowq_fx.backend._inductor import run_and_get_generated_code
from glowq_fx.kernels import cpu_gemv, cpu_int4
from glowq_fx.modules.kernels import use_cpu_kernels
from glowq_fx.modules.linear import QuantizedLinear
from tests_helpers import tiny_llama_config

pytestmark = pytest.mark.skipif(cpu_int4.unsupported_reason(64, 64) is not None,
                                reason=f"no CPU int4 kernel here: {cpu_int4.unsupported_reason(64, 64)}")

INT4_CALL = re.compile(r"torch\.ops\.(glowq_cpu\.w4a16_gemv|quantized\.int4mm_packed_weight_cpu|"
                       r"aten\._weight_int4pack_mm_for_cpu)\.default\(")
# our GEMV runs a group's members in one call; Inductor asserts the layout of each of its outputs
GROUP_CALL = re.compile(r"torch\.ops\.glowq_cpu\.w4a16_gemv_group\.default\(")
GROUP_MEMBER = re.compile(r"assert_size_stride\(\w+, .*'torch\.ops\.glowq_cpu\.w4a16_gemv_group\.default'\)")
GLOWQ_OP = "torch.ops.glowq."  # an opaque glowq op (the GEMV is torch.ops.glowq_cpu.)


def int4_products(code: str) -> int:
    """How many 4-bit products the generated code runs (a call each, or a member of a group call)."""
    return len(INT4_CALL.findall(code)) + len(GROUP_MEMBER.findall(code))


KERNELS = [pytest.param("auto", id="auto"),
           pytest.param("aten", id="aten", marks=pytest.mark.skipif(cpu_int4.unsupported_reason(64, 64, "aten")
                                                                    is not None, reason="no PyTorch int4 kernel here"))]
NAMES = {"glowq": ("cpu_gemv", "cpu_gemv8", "glowq_cpu.w8a16_gemv"),
         "aten": ("cpu_int4", "cpu_int8", "_weight_int8pack_mm")}
INPUT_SHAPE = re.compile(r"assert_size_stride\((\w+), \((\d+), (\d+)\), \(\d+, \d+\), 'input'\)")
KERNEL_CALL = re.compile(r"^\s*(?:\w+ = )?(?:cpp_fused_\w+|extern_kernels\.\w+|torch\.ops\.[\w.]+)\((.*)\)\s*$", re.M)
ALLOC = re.compile(r"empty_strided_cpu\(\((\d+), (\d+)\), \(\d+, \d+\), torch\.(float32|bfloat16)\)")


@functools.lru_cache(maxsize=None)
def _quantized(dtype=torch.float32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T.LlamaForCausalLM(tiny_llama_config()).eval().to(dtype)
    g = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, 128, (2, 32), generator=g)} for _ in range(3)]
    report = quantize_(model, calibration, GlowQConfig(group_size=32, rank=8), progress=False)
    return model, report


def _ids(t, seed=3):
    return torch.randint(0, 128, (1, t), generator=torch.Generator().manual_seed(seed))


def _compiled(model, ids):
    with torch.no_grad():
        ref = model(ids).logits
        out, codes = run_and_get_generated_code(torch.compile(model, backend=glowq_backend), ids)
    return ref, out.logits, "\n".join(codes)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_runs_the_int4_kernel_with_one_projection_per_group(dtype, kernel):
    model, report = _quantized(dtype)
    model = copy.deepcopy(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    kernels = use_cpu_kernels(model, kernel=kernel)
    int4_name, int8_name, int8_call = NAMES[cpu_int4.chosen_kernel(kernel)]
    assert kernels.pop("lm_head") == int8_name and set(kernels.values()) == {int4_name}  # the default int8 head
    ref, out, code = _compiled(model, _ids(1))
    # compiled equals eager: the same int4 path (kernel, epilogue in the model's dtype); a bf16
    # model's other ops round differently once fused (Inductor computes in float32)
    tol = {torch.float32: 1e-3, torch.bfloat16: 2e-2}[dtype]
    assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    assert GLOWQ_OP not in code  # nothing opaque is left
    assert int4_products(code) == len(linears) and int8_call in code
    # our GEMV: one call per group, each group's R made inside it from B
    assert len(GROUP_CALL.findall(code)) == (len(report.groups) if int4_name == "cpu_gemv" else 0)
    # one R = x B^T per group: as many B inputs (rank, in_features) as groups, each read by one
    # kernel (for a decode row the projection is a reduction Inductor fuses into a kernel of its own)
    rank = report.config.rank
    B_inputs = {name for name, r, k in INPUT_SHAPE.findall(code) if int(r) == rank and int(k) != rank}
    assert len(B_inputs) == len(report.groups)
    calls = [re.findall(r"\w+", args) for args in KERNEL_CALL.findall(code)]
    assert all(sum(B in args for args in calls) == 1 for B in B_inputs)
    weights = {(m.out_features, m.in_features) for m in linears.values()} | \
        {(m.in_features, m.out_features) for m in linears.values()} | {tuple(model.lm_head.qweight.shape)}
    assert not [a for a in ALLOC.findall(code) if (int(a[0]), int(a[1])) in weights]  # no float weight made


@pytest.mark.parametrize("rows", [1, 5])
def test_compiled_linear_equals_eager_in_bfloat16(rows):
    """One group in bf16: the compiled int4 path (kernel, projection, fused epilogue) against the
    eager op, within 1e-3 of the output's scale."""
    model, _ = _quantized(torch.bfloat16)
    attn = copy.deepcopy(model.model.layers[0].self_attn)
    use_cpu_kernels(attn)
    x = torch.randn(1, rows, attn.q_proj.in_features, dtype=torch.bfloat16)

    def qkv(x):
        return torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)

    with torch.no_grad():
        ref = qkv(x)
        out, codes = run_and_get_generated_code(torch.compile(qkv, backend=glowq_backend), x)
    assert int4_products("\n".join(codes)) == 3
    assert (out.float() - ref.float()).abs().max() <= 1e-3 * ref.float().abs().max()


def test_prefill_dequantizes_in_one_fused_loop_and_equals_eager():
    model, report = _quantized()
    model = copy.deepcopy(model)
    use_cpu_kernels(model)
    ref, out, code = _compiled(model, _ids(max(cpu_int4.MAX_ROWS, cpu_gemv.MAX_ROWS) + 8))
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()  # the float reference on both sides
    assert GLOWQ_OP not in code and not int4_products(code)


def test_reference_path_is_lowered_too():
    """Linears the int4 kernel cannot take (here: every one, disabled) are lowered to dequantize
    + matmul, the projections still shared."""
    model, report = _quantized()
    model = copy.deepcopy(model)
    use_cpu_kernels(model, enable=False)
    ref, out, code = _compiled(model, _ids(2))
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert GLOWQ_OP not in code and not int4_products(code)


def test_lower_false_keeps_the_ops_opaque():
    model, _ = _quantized()
    model = copy.deepcopy(model)
    use_cpu_kernels(model)
    with torch.no_grad():
        _, codes = run_and_get_generated_code(
            torch.compile(model, backend=glowq_backend, options={"glowq.lower": False}), _ids(1))
    assert "torch.ops.glowq.w4a16_linear_int4pack.default(" in "\n".join(codes)


def test_another_cpu_without_the_kernel_loads_and_runs_the_reference(tmp_path, monkeypatch, caplog):
    """A checkpoint holds the portable codes only: a CPU without the kernel loads it onto the
    reference path with one warning, and gets the reference's logits."""
    from glowq_fx import load_quantized, save_quantized

    model, _ = _quantized()
    model = copy.deepcopy(model)
    save_quantized(model, tmp_path / "q")
    monkeypatch.setattr(cpu_int4, "capability", lambda: "DEFAULT")
    monkeypatch.setattr(cpu_gemv, "unavailable_reason", lambda: "this CPU's PyTorch kernels dispatch to DEFAULT")
    loaded = load_quantized(tmp_path / "q")
    assert all(m.int4pack is None for m in loaded.modules() if isinstance(m, QuantizedLinear))
    assert loaded.lm_head.kernel_scales is None  # the int8 head's kernel is not vectorised there either
    assert any("not vectorised" in r.getMessage() for r in caplog.records)
    use_cpu_kernels(model, enable=False)
    with torch.no_grad():
        assert torch.equal(loaded(_ids(4)).logits, model(_ids(4)).logits)
