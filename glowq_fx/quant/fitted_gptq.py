"""GPTQ on fitted grids: each group's scale and fractional zero point fitted (``quant.fitted``) to
the weights as GPTQ's earlier columns left them, weighted by ``diag(S)``; then GPTQ's rounding with
error feedback on that grid (``quant.gptq``).

RTN's min/max grid wastes part of its 16 levels when a group's range is set by one outlier or
when an integer zero point shifts it; the fitted grid does not, and GPTQ then spends the rounding
error where ``S`` says the inputs do not look. With ``first_position_weight`` (the attention
sink's share of ``S``) this is the GPTQ that SmolLM2 rewards (``benchmarks/results/gptq_sink.md``).
"""
from __future__ import annotations

from torch import Tensor

from glowq_fx.config import QuantizationConfig
from glowq_fx.quant.fitted import fitted_grids
from glowq_fx.quant.gptq import quantize_gptq
from glowq_fx.quant.rtn import QuantizedWeight
from glowq_fx.registry import QUANTIZERS


def quantize_fitted_gptq(W: Tensor, S: Tensor, group_size: int = 128, *, bits: int = 4, symmetric: bool = False,
                         damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                         shrink: float = 0.0) -> QuantizedWeight:
    """GPTQ of ``W`` (N, K) with ``S`` (K, K) on each group's fitted grid (module docstring)."""

    def fitted_grid(w: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        s, z, _ = fitted_grids(w, d, bits=bits, symmetric=symmetric, dtype=W.dtype)
        return s, z

    return quantize_gptq(W, S, group_size, bits=bits, symmetric=symmetric, damp=damp, block_size=block_size,
                         act_order=act_order, shrink=shrink, grid=fitted_grid)


@QUANTIZERS.register("fitted-gptq")
def fitted_gptq_quantizer(W: Tensor, S: Tensor, config: QuantizationConfig) -> QuantizedWeight:
    """``GlowQConfig(quantizer="fitted-gptq")``: GPTQ on fitted grids, driven by the group's ``S``."""
    return quantize_fitted_gptq(W, S, config.group_size, bits=config.bits, symmetric=config.symmetric,
                                damp=config.gptq_damp, block_size=config.gptq_block_size,
                                act_order=config.gptq_act_order, shrink=config.gptq_shrink)
