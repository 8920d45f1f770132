"""INT4 base quantizers: codes and grids, independent of the kernels' packed layout."""
from glowq_fx.quant.clip import quantize_clipped
from glowq_fx.quant.fitted import quantize_fitted
from glowq_fx.quant.fitted_gptq import quantize_fitted_gptq
from glowq_fx.quant.gptq import quantize_gptq
from glowq_fx.quant.rtn import QuantizedWeight, group_geometry, quantization_error, quantize_rtn

__all__ = ["QuantizedWeight", "group_geometry", "quantization_error", "quantize_clipped", "quantize_fitted",
           "quantize_fitted_gptq", "quantize_gptq", "quantize_rtn"]
