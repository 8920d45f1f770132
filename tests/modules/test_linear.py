"""modules.linear: a QuantizedLinear computes its formula; one B per group, shared by reference."""
import json

import pytest
import torch

from glowq_fx import GlowQConfig, quantize_
from glowq_fx.modules import QuantizedLinear, SharedProjection
from tests_helpers import tiny_llama, token_batches


def test_quantized_linear_matches_its_formula(gen):
    model = tiny_llama()
    report = quantize_(model, token_batches(), GlowQConfig(group_size=32, rank=8), progress=False)
    q = model.model.layers[0].self_attn.k_proj
    assert isinstance(q, QuantizedLinear) and q.rank == 8
    B = q.projection.B
    x = torch.randn(5, 64, generator=gen)
    assert q.A.dtype == B.dtype == torch.bfloat16  # a float32 model's factors are stored in bfloat16
    expected = x @ (q.dequantized_weight() + q.A.float() @ B.float()).T
    if q.int4pack is not None:  # the CPU int4 kernel: bf16 activations (tests/kernels/test_cpu_int4.py)
        assert (q(x) - expected).abs().max() <= 1e-2 * expected.abs().max()
        q.use_cpu_int4_kernel(False)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-6)  # the reference path
    # one B per group, shared by reference and registered once on the attention module
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.projection is attn.k_proj.projection is attn.v_proj.projection
    assert isinstance(attn.glowq_projections["{q_proj,k_proj,v_proj}"], SharedProjection)
    keys = [k for k in model.state_dict() if k.endswith(".B")]
    assert len(keys) == len(report.groups)
    # the report adds up what the modules hold
    g = report.groups[0]
    members = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert g.code_bytes == sum(m.qweight.nbytes for m in members)
    assert g.scale_bytes == sum(m.scales.nbytes + m.zeros.nbytes for m in members)
    assert g.factor_bytes == sum(m.A.nbytes for m in members) + B.nbytes
    assert g.error_after < g.error_before
    json.dumps(report.to_dict())
    text = str(report)
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in text and "lm_head" in text


def test_set_correction_checks_shapes():
    model = tiny_llama()
    quantize_(model, token_batches(1), GlowQConfig(group_size=32, rank=8), progress=False)
    linear = next(m for m in model.modules() if isinstance(m, QuantizedLinear) and m.A is not None)
    with pytest.raises(ValueError, match="both A and its projection"):
        linear.set_correction(linear.A, None)
    with pytest.raises(ValueError, match="to match the projection"):
        linear.set_correction(linear.A[:, :-1], linear.projection)
