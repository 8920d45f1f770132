"""Runtime modules that ``quantize_`` swaps in (the 4-bit linear and the shared projection), and
the one place that installs them into a model (``install``)."""
from glowq_fx.modules.linear import QuantizedLinear, SharedProjection

__all__ = ["QuantizedLinear", "SharedProjection"]
