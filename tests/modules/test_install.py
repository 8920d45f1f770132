"""modules.install: the one place that swaps linears and registers a group's projection."""
import pytest
import torch
from torch import nn

from glowq_fx.kernels.layout import pack
from glowq_fx.modules.install import PROJECTIONS, attach_correction, detach_correction, projection_slot, replace_module
from glowq_fx.modules.linear import QuantizedLinear
from glowq_fx.quant import quantize_rtn


def _block(gen):
    block = nn.Module()
    block.attn = nn.Module()
    for name in ("q", "k"):
        W = torch.randn(16, 32, generator=gen)
        setattr(block.attn, name, QuantizedLinear(pack(quantize_rtn(W, 32))))
    block.mlp = nn.Linear(32, 8)
    return block


def test_attach_registers_one_projection_on_the_common_ancestor_and_detach_removes_it(gen):
    block = _block(gen)
    B, As = torch.randn(4, 32, generator=gen), [torch.randn(16, 4, generator=gen) for _ in range(2)]
    projection = attach_correction(block, ["attn.q", "attn.k"], B, As)
    assert projection_slot(block, ["attn.q", "attn.k"]) == (block.attn, "{q,k}")
    assert getattr(block.attn, PROJECTIONS)["{q,k}"] is projection
    assert block.attn.q.projection is block.attn.k.projection is projection
    assert [k for k in block.state_dict() if k.endswith(".B")] == [f"attn.{PROJECTIONS}.{{q,k}}.B"]
    x = torch.randn(3, 32, generator=gen)
    torch.testing.assert_close(block.attn.k(x), x @ (block.attn.k.dequantized_weight() + As[1] @ B).T)
    detach_correction(block, ["attn.q", "attn.k"])
    assert not hasattr(block.attn, PROJECTIONS) and block.attn.q.A is None and block.attn.q.projection is None


def test_replace_module_and_a_correction_for_a_float_linear(gen):
    block = _block(gen)
    new = QuantizedLinear(pack(quantize_rtn(block.mlp.weight.detach(), 32)), block.mlp.bias)
    replace_module(block, "mlp", new)
    assert block.mlp is new
    block.other = nn.Linear(32, 8)
    with pytest.raises(ValueError, match="other is a Linear, not a QuantizedLinear"):
        attach_correction(block, ["other"], torch.randn(2, 32), [torch.randn(8, 2)])
