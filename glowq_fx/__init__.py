"""glowq-fx: GlowQ group-shared low-rank correction for 4-bit LLMs, as a PyTorch library.

``quantize_(model, calibration, GlowQConfig())`` quantizes a model in place; ``find_groups``
shows the input-sharing groups it would use.
"""
from glowq_fx.capture import GlowQWarning, GroupDiscovery, find_groups
from glowq_fx.config import GlowQConfig
from glowq_fx.quantize import QuantizationReport, quantize_

__version__ = "0.1.0"
__all__ = ["GlowQConfig", "GlowQWarning", "GroupDiscovery", "QuantizationReport", "__version__", "find_groups", "quantize_"]
